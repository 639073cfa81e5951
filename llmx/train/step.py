"""What the loop trains: a `Trainable` of pure functions over a state pytree.

The functional style of Flax's performance guide: the model is split once into a graph definition
and a state pytree, and each step is a pure function of that state, which the loop jit-compiles
and donates. `supervised()` builds the Trainable for any model with a loss function; a model
family that needs another step (a GAN's two optimizers) builds its own.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# loss_fn(model, batch) -> loss, or (loss, {name: scalar}) for extra metrics.
LossFn = Callable[[nnx.Module, Any], Any]


@dataclasses.dataclass(frozen=True)
class Trainable:
  init: Callable[[], dict]                      # -> state; must hold `step` and `nonfinite_step`
  train_step: Callable[[dict, Any], tuple]      # (state, batch) -> (state like init's, {name: scalar})
  eval_step: Callable[[dict, Any], dict]        # (state, batch) -> {name: scalar}
  model_of: Callable[[dict], nnx.Module]        # state -> the model in eval mode
  # Top-level state keys that init() rebuilds and checkpoints leave out (the frozen base weights
  # of a LoRA run: restored from the base checkpoint, not from every save).
  unsaved: tuple[str, ...] = ()


def _split_aux(out):
  return out if isinstance(out, tuple) else (out, {})


def track_nonfinite(state, *values):
  """The first step whose loss or gradient norm (`values`, scalars the step computes anyway) was
  NaN/Inf (-1 while none). The loop checks it, and the parameters themselves, on the host before
  every save, so a state broken by its last update is never written over a good checkpoint."""
  finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(v, jnp.float32) for v in values])))
  bad = (state["nonfinite_step"] < 0) & ~finite
  return jnp.where(bad, state["step"] + 1, state["nonfinite_step"])


def cast_floats(tree, dtype):
  """Floating-point leaves of `tree` in `dtype` (mixed precision: float32 params, bf16 compute)."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def compute_in(model: nnx.Module, dtype) -> nnx.Module:
  """Layers that fixed a computation dtype when built (nnx.Embed takes its table's float32)
  compute in `dtype`; the others follow their (cast) params. The model is a fresh merge."""
  if dtype is not None:
    for _, module in nnx.iter_modules(model):
      if getattr(module, "dtype", None) is not None and jnp.issubdtype(module.dtype, jnp.floating):
        module.dtype = dtype
  return model


def microbatches(batch, k: int):
  """[B, ...] -> [k, B / k, ...]; micro-batch i holds rows i, i + k, i + 2k, ... so that, with
  the batch split over devices along B, every device holds an equal share of each micro-batch
  and no rows move between devices."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def supervised(model: nnx.Module | Callable[[], nnx.Module], tx: optax.GradientTransformation,
               loss_fn: LossFn, *, grad_accum_steps: int = 1, grad_accum_unroll: bool = False,
               compute_dtype=None, wrt=nnx.Param) -> Trainable:
  """One model, one optimizer, gradient descent on `loss_fn`. State = {params, rest (RNG streams
  and other non-parameter variables), opt_state, step, nonfinite_step}, plus `frozen` (the other
  nnx.Params, not trained nor checkpointed) when `wrt` trains only some of the parameters.

  model: the model, or a function that builds it. With a function, `init` builds the model, so
    the loop's `jax.jit(init, out_shardings=...)` creates every parameter directly in its shards
    (no device ever holds the whole model); with a module, `init` returns its arrays.
  grad_accum_steps: each step averages the gradients of this many micro-batches of the batch
    (`lax.scan`, one optimizer update), for batches larger than memory allows.
  grad_accum_unroll: the micro-batches as independent computations instead of a `lax.scan`: XLA
    may then run them at the same time (XLA:CPU gives each a core), but holds all their
    activations at once, so it saves no memory. For speed on a CPU, not for memory. With one
    micro-batch it changes nothing.
  compute_dtype: e.g. jnp.bfloat16: the forward and backward passes run on a copy of the params
    in this dtype; the params, their gradients and the optimizer state stay float32.
  wrt: the variables trained (an nnx filter): nnx.Param, or nnx.LoRAParam for LoRA adapters alone.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps}: must be >= 1")
  build = None if isinstance(model, nnx.Module) else model
  template = model if build is None else nnx.eval_shape(build)
  # The train step runs the model in training mode (dropout on) whatever mode it was handed in
  # (a pretrained model loads in eval mode); eval_step and model_of run it in eval mode.
  template.train()
  filters = (wrt, ...) if wrt is nnx.Param else (wrt, nnx.Param, ...)
  graphdef, *template_states = nnx.split(template, *filters)
  template.eval()
  eval_graphdef = nnx.split(template, *filters)[0]
  template.train()
  has_frozen = wrt is not nnx.Param

  def init():
    states = template_states
    if build is not None:
      states = nnx.split(build(), *filters)[1:]
    p, r = states[0], states[-1]
    state = dict(params=p, rest=r, opt_state=tx.init(p),
                 step=jnp.zeros((), jnp.int32), nonfinite_step=jnp.full((), -1, jnp.int32))
    if has_frozen:
      state["frozen"] = states[1]
    return state

  def merge(graphdef, params, state, **kw):
    """The model from (cast) params and the state's frozen and other variables."""
    frozen = (cast_floats(state["frozen"], compute_dtype),) if has_frozen else ()
    return nnx.merge(graphdef, cast_floats(params, compute_dtype), *frozen, state["rest"], **kw)

  def loss_and_grads(params, frozen, rest, batch):
    def loss_of(params):
      # copy=True: fresh Variables at this trace level, so dropout may advance its RNG counters.
      model = merge(graphdef, params, dict(frozen=frozen, rest=rest), copy=True)
      loss, aux = _split_aux(loss_fn(compute_in(model, compute_dtype), batch))
      return loss.astype(jnp.float32), (aux, nnx.state(model, nnx.Not(nnx.Param)))  # the advanced counters

    (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, aux, rest, grads

  def accumulated(params, frozen, rest, batch):
    """The mean loss, metrics and gradients of `grad_accum_steps` micro-batches."""
    micro = microbatches(batch, grad_accum_steps)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    if grad_accum_unroll:
      total = None
      for i in range(grad_accum_steps):
        loss, aux, rest, grads = loss_and_grads(params, frozen, rest,
                                                jax.tree.map(lambda x: x[i], micro))
        total = (loss, aux, grads) if total is None else add(total, (loss, aux, grads))
      loss, aux, grads = total
    else:
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(loss_and_grads, params, frozen, rest, first)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1], shapes[3]))

      def body(carry, mb):
        loss_sum, aux_sum, grads_sum, rest = carry
        loss, aux, rest, grads = loss_and_grads(params, frozen, rest, mb)
        return (loss_sum + loss, add(aux_sum, aux), add(grads_sum, grads), rest), None

      (loss, aux, grads, rest), _ = jax.lax.scan(body, (*zeros, rest), micro)
    mean = lambda t: jax.tree.map(lambda x: x / grad_accum_steps, t)
    return mean(loss), mean(aux), rest, mean(grads)

  def train_step(state, batch):
    step_fn = loss_and_grads if grad_accum_steps == 1 else accumulated
    loss, aux, rest, grads = step_fn(state["params"], state.get("frozen"), state["rest"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    new_state = dict(state, params=optax.apply_updates(state["params"], updates), rest=rest,
                     opt_state=opt_state, step=state["step"] + 1,
                     nonfinite_step=track_nonfinite(state, loss, grad_norm))
    return new_state, dict(train_loss=loss, grad_norm=grad_norm, **aux)

  def eval_step(state, batch):
    model = merge(eval_graphdef, state["params"], state)
    loss, aux = _split_aux(loss_fn(compute_in(model, compute_dtype), batch))
    return dict(loss=loss.astype(jnp.float32), **aux)

  def model_of(state):
    frozen = (state["frozen"],) if has_frozen else ()
    return nnx.merge(eval_graphdef, state["params"], *frozen, state["rest"])

  return Trainable(init=init, train_step=train_step, eval_step=eval_step, model_of=model_of,
                   unsaved=("frozen",) if has_frozen else ())

"""The jit-compiled train and eval steps, in the functional style: the model is split once into a
graph definition and a state pytree, and each step is a pure function of that state (donated)."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# loss_fn(model, batch) -> loss, or (loss, {name: scalar}) for extra metrics.
LossFn = Callable[[nnx.Module, Any], Any]


def _split_aux(out):
  return out if isinstance(out, tuple) else (out, {})


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """-> (graphdef, state). state = {params, rest (RNG streams and other non-params), opt_state,
  step, nonfinite_step}; `nonfinite_step` remembers the first step whose loss was NaN/Inf."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = dict(params=params, rest=rest, opt_state=tx.init(params),
               step=jnp.zeros((), jnp.int32), nonfinite_step=jnp.full((), -1, jnp.int32))
  return graphdef, state


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    *, in_shardings=None, out_shardings=None):
  def train_step(state, batch):
    def loss_of(params):
      model = nnx.merge(graphdef, params, state["rest"])
      loss, aux = _split_aux(loss_fn(model, batch))
      # Dropout advanced its RNG counters: carry them to the next step.
      return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss)
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1,
                               state["nonfinite_step"])
    new_state = dict(params=params, rest=rest, opt_state=opt_state, step=state["step"] + 1,
                     nonfinite_step=nonfinite_step)
    metrics = dict(train_loss=loss, grad_norm=optax.global_norm(grads), **aux)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0, in_shardings=in_shardings,
                 out_shardings=out_shardings)


def make_eval_step(eval_graphdef, loss_fn: LossFn):
  """Loss of the model in eval mode (dropout off) on one batch."""
  def eval_step(state, batch):
    model = nnx.merge(eval_graphdef, state["params"], state["rest"])
    loss, aux = _split_aux(loss_fn(model, batch))
    return dict(loss=loss, **aux)
  return jax.jit(eval_step)

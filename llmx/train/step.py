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
  train_step: Callable[[dict, Any], tuple]      # (state, batch) -> (state, {name: scalar})
  eval_step: Callable[[dict, Any], dict]        # (state, batch) -> {name: scalar}
  model_of: Callable[[dict], nnx.Module]        # state -> the model in eval mode


def _split_aux(out):
  return out if isinstance(out, tuple) else (out, {})


def track_nonfinite(state, loss):
  """The first step whose loss was NaN/Inf (-1 while none): checked on the host before saving."""
  bad = (state["nonfinite_step"] < 0) & ~jnp.isfinite(loss)
  return jnp.where(bad, state["step"] + 1, state["nonfinite_step"])


def supervised(model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn) -> Trainable:
  """One model, one optimizer, gradient descent on `loss_fn`. State = {params, rest (RNG streams
  and other non-parameter variables), opt_state, step, nonfinite_step}."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.split(model)[0]
  model.train()

  def init():
    return dict(params=params, rest=rest, opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32), nonfinite_step=jnp.full((), -1, jnp.int32))

  def train_step(state, batch):
    def loss_of(params):
      # copy=True: fresh Variables at this trace level, so dropout may advance its RNG counters.
      model = nnx.merge(graphdef, params, state["rest"], copy=True)
      loss, aux = _split_aux(loss_fn(model, batch))
      return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))  # carry the advanced counters

    (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(params=optax.apply_updates(state["params"], updates), rest=rest,
                     opt_state=opt_state, step=state["step"] + 1,
                     nonfinite_step=track_nonfinite(state, loss))
    return new_state, dict(train_loss=loss, grad_norm=optax.global_norm(grads), **aux)

  def eval_step(state, batch):
    loss, aux = _split_aux(loss_fn(model_of(state), batch))
    return dict(loss=loss, **aux)

  def model_of(state):
    return nnx.merge(eval_graphdef, state["params"], state["rest"])

  return Trainable(init=init, train_step=train_step, eval_step=eval_step, model_of=model_of)

"""The classic two-layer perceptron, as a binary classifier:

  x [batch, features] -> Linear -> activation -> Linear -> logit [batch]

p(y = 1 | x) = sigmoid(logit); trained with `llmx.train.losses.binary_cross_entropy`, which takes
the logit itself (stable where the sigmoid saturates).
"""
import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}


class MLPClassifier(nnx.Module):
  """features -> hidden units -> one logit; nnx.Linear's default initialisation (LeCun normal
  weights, zero biases)."""

  def __init__(self, features: int, hidden: int, activation: str = "relu", *, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}: must be one of {', '.join(map(repr, ACTIVATIONS))}")
    self.activation = activation  # a name, not a function: the module's structure stays plain data
    self.hidden = nnx.Linear(features, hidden, rngs=rngs)
    self.output = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float [batch, features] -> logits float [batch]."""
    h = ACTIVATIONS[self.activation](self.hidden(x))
    return self.output(h)[:, 0]

"""Losses, each a pure function of arrays: regression, classification and the GANs' adversarial
losses. Every loss computes in float32 (or wider), whatever its inputs' dtype.

  mse                   mean((prediction - target)^2)
  binary_cross_entropy  -y log s(x) - (1 - y) log(1 - s(x)) = softplus(x) - y x   (from logits x)
  cross_entropy         -sum_c q_c log softmax(z)_c, q = (1 - s) onehot(y) + s / C, + z-loss

`kernels.linear_cross_entropy` is the same cross-entropy fused with the output projection, for
vocabularies too large to hold the logits; `cross_entropy` here takes logits already made.

GANs: the discriminator (critic) returns one real-valued logit per sample, `D(x) = sigmoid^-1(p_real)`
for the minimax and non-saturating losses and an unbounded score for hinge and WGAN. With
`r = D(x_real)` and `f = D(G(z))`, each [batch] float:

  name            discriminator minimises                 generator minimises
  minimax         -log s(r) - log(1 - s(f))               log(1 - s(f)) = -softplus(f)
  non_saturating  -log s(r) - log(1 - s(f))               -log s(f)     =  softplus(-f)
  hinge           relu(1 - r) + relu(1 + f)               -f
  wgan_gp         f - r  (+ gp_weight * gradient_penalty)  -f

(s: sigmoid; log s(x) = -softplus(-x) and log(1 - s(x)) = -softplus(x), stable for any logit.)
Goodfellow et al. 2014 (minimax and its non-saturating generator), Lim & Ye 2017 / Miyato et al.
2018 (hinge), Gulrajani et al. 2017 (WGAN-GP).
"""
from typing import Callable

import jax
import jax.numpy as jnp

from llmx.errors import LlmxError
from llmx_kernels.cross_entropy import IGNORE_INDEX

REDUCTIONS = ("mean", "sum", "none")


def _float(x: jax.Array) -> jax.Array:
  """x in float32, or float64 if it already is (bf16 inputs are not summed in bf16)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _reduce(loss: jax.Array, reduction: str, count=None) -> jax.Array:
  """mean (over `count` items when given, 0 when there are none), sum, or none."""
  if reduction == "none":
    return loss
  if reduction == "sum":
    return jnp.sum(loss)
  if reduction == "mean":
    return jnp.mean(loss) if count is None else jnp.sum(loss) / jnp.maximum(count, 1)
  raise ValueError(f"reduction={reduction!r}: must be one of {', '.join(map(repr, REDUCTIONS))}")


# ----------------------------------------------------------------------- regression, classification

def mse(predictions: jax.Array, targets: jax.Array, *, reduction: str = "mean") -> jax.Array:
  """Squared error. predictions, targets: float [...] (the same shape) -> scalar, or [...] with
  reduction="none"."""
  return _reduce(jnp.square(_float(predictions) - _float(targets)), reduction)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                         reduction: str = "mean") -> jax.Array:
  """Cross-entropy of a Bernoulli with logit x against label y, softplus(x) - y x (stable for any
  logit). logits: float [...]; labels: [...] of 0/1 (or probabilities in [0, 1]), the same shape
  -> scalar, or [...] with reduction="none"."""
  x, y = _float(logits), _float(labels)
  return _reduce(jax.nn.softplus(x) - y * x, reduction)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> jax.Array:
  """Multi-class cross-entropy from logits, with the algebra of `kernels.linear_cross_entropy`:
  per position, with lse = logsumexp(z) over the C classes,

    loss = lse - (1 - s) z[label] - (s / C) sum(z) + z_loss * lse^2

  i.e. the cross-entropy against (1 - s) onehot + s / C (label smoothing s), plus PaLM's z-loss
  that keeps the log-normaliser near 0.

  logits: float [..., C]; labels: int [...] in [0, C), or `ignore_index` for a position with no
  loss and no gradient -> scalar: the mean over the positions not ignored (0 when all are), or the
  sum; [...] with reduction="none" (0 at ignored positions). A label outside [0, C) that is not
  `ignore_index` gives NaN, so a wrong label cannot pass for a plausible loss.
  """
  z = _float(logits)
  classes = z.shape[-1]
  valid = labels != ignore_index
  in_range = (labels >= 0) & (labels < classes)
  safe = jnp.where(valid & in_range, labels, 0)
  lse = jax.nn.logsumexp(z, axis=-1)
  loss = lse - (1.0 - label_smoothing) * jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
  if label_smoothing:
    loss = loss - (label_smoothing / classes) * jnp.sum(z, axis=-1)
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  loss = jnp.where(valid, jnp.where(in_range, loss, jnp.nan), 0.0)
  return _reduce(loss, reduction, count=jnp.sum(valid))


# ------------------------------------------------------------------------------------------- GANs

GAN_LOSSES = ("minimax", "non_saturating", "hinge", "wgan_gp")


class UnknownLossError(LlmxError, ValueError):
  pass


def check_gan_loss(name: str) -> str:
  if name not in GAN_LOSSES:
    raise UnknownLossError(f"unknown GAN loss {name!r}: must be one of {', '.join(map(repr, GAN_LOSSES))}")
  return name


def discriminator_loss(name: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Mean discriminator loss over the batch (without the gradient penalty)."""
  check_gan_loss(name)
  r, f = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if name in ("minimax", "non_saturating"):
    return jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))
  if name == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f))
  return jnp.mean(f) - jnp.mean(r)  # wgan_gp


def generator_loss(name: str, fake_logits: jax.Array) -> jax.Array:
  """Mean generator loss over the batch of the discriminator's logits for generated samples."""
  check_gan_loss(name)
  f = fake_logits.astype(jnp.float32)
  if name == "minimax":  # saturates: its gradient -s(f) vanishes while D rejects the fakes
    return -jnp.mean(jax.nn.softplus(f))
  if name == "non_saturating":
    return jnp.mean(jax.nn.softplus(-f))
  return -jnp.mean(f)  # hinge, wgan_gp


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array,
                     alpha: jax.Array) -> jax.Array:
  """WGAN-GP's penalty mean((|grad_x critic(x_hat)|_2 - 1)^2) at x_hat = alpha real + (1-alpha) fake.

  critic: [batch, ...] -> [batch], each output depending on its own sample only (no batch norm).
  real, fake: [batch, ...]; alpha: [batch] in [0, 1]. The norm is over all non-batch axes.
  """
  alpha = alpha.reshape((-1,) + (1,) * (real.ndim - 1)).astype(real.dtype)
  x_hat = alpha * real + (1 - alpha) * jax.lax.stop_gradient(fake)
  # Summing over the batch gives each sample's own input gradient in one backward pass.
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)
  # The epsilon keeps the norm differentiable where a gradient is exactly zero (dead ReLUs).
  norms = jnp.sqrt(jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=-1) + 1e-12)
  return jnp.mean(jnp.square(norms - 1.0))

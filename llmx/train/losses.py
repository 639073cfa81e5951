"""Adversarial losses for GANs, selectable by name. (Cross-entropy lives in `kernels`.)

The discriminator (critic) returns one real-valued logit per sample, `D(x) = sigmoid^-1(p_real)`
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

"""LayerNorm and RMSNorm modules over the fused kernels."""
import jax.numpy as jnp
from flax import nnx

import llmx_kernels as kernels
from llmx.nn.axes import EMBED, param


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; `use_bias=False` drops the offset (nanoGPT's `bias=False`)."""

  def __init__(self, dim: int, *, epsilon: float = 1e-5, use_bias: bool = True):
    self.scale = param(jnp.ones((dim,), jnp.float32), EMBED)
    self.offset = param(jnp.zeros((dim,), jnp.float32), EMBED) if use_bias else None
    self.epsilon = epsilon

  def __call__(self, x):
    offset = self.offset[...] if self.offset is not None else jnp.zeros_like(self.scale[...])
    return kernels.layer_norm(x, self.scale[...], offset, epsilon=self.epsilon)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, epsilon: float = 1e-6):
    self.scale = param(jnp.ones((dim,), jnp.float32), EMBED)
    self.epsilon = epsilon

  def __call__(self, x):
    return kernels.rms_norm(x, self.scale[...], epsilon=self.epsilon)

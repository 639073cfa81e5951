"""Plain-jnp layer norm and RMS norm: the "xla" implementations and the references.

Statistics are computed in float32 (float64 for float64 inputs); the output has
``x.dtype``. Each is one fused expression, differentiated by XLA's autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x, scale, offset, *, epsilon=1e-6, interpret=False, config=None):
  del interpret, config
  compute = jnp.promote_types(x.dtype, jnp.float32)
  z = x.astype(compute)
  mean = jnp.mean(z, axis=-1, keepdims=True)
  zc = z - mean
  var = jnp.mean(zc * zc, axis=-1, keepdims=True)
  y = zc * jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale.astype(compute)
  if offset is not None:
    y = y + offset.astype(compute)
  return y.astype(x.dtype)


def rms_norm(x, scale, *, epsilon=1e-6, interpret=False, config=None):
  del interpret, config
  compute = jnp.promote_types(x.dtype, jnp.float32)
  z = x.astype(compute)
  y = z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + epsilon)
  if scale is not None:
    y = y * scale.astype(compute)
  return y.astype(x.dtype)

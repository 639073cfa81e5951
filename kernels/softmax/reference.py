"""Plain-jnp softmax: the "xla" implementation and the reference for the kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax(x, where=None, *, axis=(-1,), scale=1.0, interpret=False, config=None):
  """Softmax of ``scale * x`` over ``axis``; masked entries get 0, empty rows give zeros.

  Computed in float32 (or float64 for float64 inputs), returned in ``x.dtype``.
  Differentiated by XLA's autodiff (one fused expression forward and backward).
  """
  del interpret, config
  compute = jnp.promote_types(x.dtype, jnp.float32)
  z = x.astype(compute)
  if scale != 1.0:
    z = z * scale
  if where is not None:
    z = jnp.where(where, z, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
  m = jnp.where(m == -jnp.inf, 0.0, m)  # a row with nothing allowed: exp(-inf) = 0
  e = jnp.exp(z - m)
  s = jnp.sum(e, axis=axis, keepdims=True)
  return (e / jnp.where(s == 0.0, 1.0, s)).astype(x.dtype)

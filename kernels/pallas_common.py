"""Helpers every Pallas backend shares, Triton and Mosaic alike.

``out_struct``: the output ``ShapeDtypeStruct`` of a ``pallas_call`` that also runs under
``shard_map`` (where Pallas must know over which mesh axes each output varies).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def out_struct(shape, dtype, *like):
  """``ShapeDtypeStruct`` for a kernel output. Under ``shard_map`` Pallas must know over which
  mesh axes the output varies: the union of ``like`` (the inputs it is computed from). The
  field is ``manual_axis_type`` on jax 0.10 and ``vma`` on other versions."""
  ref = like[0]
  for x in like[1:]:
    ref = ref.ravel()[:1].astype(jnp.float32) + x.ravel()[:1].astype(jnp.float32)
  aval = jax.typeof(ref)
  for field, attr in (("manual_axis_type", "mat"), ("vma", "vma")):
    value = getattr(aval, attr, None)
    if value is not None:
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{field: value})
      except TypeError:
        pass
  return jax.ShapeDtypeStruct(shape, dtype)

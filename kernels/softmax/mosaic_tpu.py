"""Softmax as Pallas TPU (Mosaic) kernels, forward and backward (``jax.custom_vjp``).

The input is viewed as ``[rows, cols]`` (softmax axes moved last and flattened) and padded
inside the op to ``[rows_p, cols_p]``: ``cols_p`` a multiple of 128 lanes, padded with
``-inf`` so padding gets probability 0, ``rows_p`` a multiple of the row block. Each grid
step holds ``block_rows`` whole rows in VMEM. Masked entries (``where`` False) become
``-inf`` before the kernel (XLA fuses that into the padding); a row with nothing allowed
gets zeros and zero gradient. The backward writes ``scale * p * (g - sum(p * g))`` from the
saved probabilities.

Rows longer than ``MAX_COLS`` do not fit VMEM as whole-row blocks: those calls run the XLA
reference instead (one warning per shape).
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import mosaic_common as mc
from .. import pallas_common as pc
from . import reference

_F32 = jnp.float32
MAX_COLS = 32768  # 8 rows x 32K float32 = 1 MiB per block; the backward holds ~10 such
_warned: set = set()


def _fwd_kernel(x_ref, o_ref, *, scale):
  z = x_ref[...].astype(_F32)
  if scale != 1.0:
    z = z * scale
  m = jnp.max(z, axis=1, keepdims=True)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  e = jnp.exp(z - m)
  s = jnp.sum(e, axis=1, keepdims=True)
  o_ref[...] = (e * (1.0 / jnp.where(s == 0.0, 1.0, s))).astype(o_ref.dtype)


def _bwd_kernel(p_ref, g_ref, dx_ref, *, scale):
  p = p_ref[...].astype(_F32)
  g = g_ref[...].astype(_F32)
  dot = jnp.sum(p * g, axis=1, keepdims=True)
  dx_ref[...] = (scale * p * (g - dot)).astype(dx_ref.dtype)


def _call(kernel, name, out_dtype, block_rows, interpret, *arrays):
  rows, cols = arrays[0].shape
  br = block_rows
  spec = pl.BlockSpec((br, cols), lambda i: (i, 0))
  return pl.pallas_call(
      kernel, grid=(rows // br,), in_specs=[spec] * len(arrays), out_specs=spec,
      out_shape=pc.out_struct((rows, cols), out_dtype, *arrays),
      compiler_params=mc.compiler_params("parallel"), interpret=mc.interpret_mode(interpret),
      name=name,
  )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _softmax2(xp, scale, block_rows, interpret):
  return _call(functools.partial(_fwd_kernel, scale=scale), "softmax_fwd", xp.dtype,
               block_rows, interpret, xp)


def _softmax2_fwd(xp, scale, block_rows, interpret):
  p = _softmax2(xp, scale, block_rows, interpret)
  return p, p


def _softmax2_bwd(scale, block_rows, interpret, p, g):
  dx = _call(functools.partial(_bwd_kernel, scale=scale), "softmax_bwd", p.dtype, block_rows,
             interpret, p, g.astype(p.dtype))
  return (dx,)


_softmax2.defvjp(_softmax2_fwd, _softmax2_bwd)


def softmax(x, where=None, *, axis=(-1,), scale=1.0, interpret=False, config=None):
  """Softmax over ``axis`` (a tuple of normalised axes) with Pallas TPU kernels.

  ``config={"block_rows": r}`` fixes the rows per block (a multiple of 8, 16 for 2-byte
  dtypes); by default about 256K elements per block.
  """
  nd = x.ndim
  axes = tuple(sorted(a % nd for a in axis))
  moved = tuple(range(nd - len(axes), nd))
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)
  xt = jnp.moveaxis(x, axes, moved) if axes != moved else x
  cols = math.prod(xt.shape[nd - len(axes):])
  rows = math.prod(xt.shape[:nd - len(axes)])
  cols_p = mc.round_up(cols, mc.LANES)
  if cols_p > MAX_COLS:
    if cols not in _warned:
      _warned.add(cols)
      warnings.warn(f"softmax mosaic_tpu: rows of {cols} elements exceed MAX_COLS={MAX_COLS} "
                    "(whole rows per VMEM block); using the 'xla' implementation", stacklevel=3)
    return reference.softmax(x, None, axis=axes, scale=scale)
  br = (config or {}).get("block_rows") or mc.row_block(rows, cols_p, x.dtype)
  if br % mc.sublanes(x.dtype):
    raise ValueError(f"softmax mosaic_tpu: block_rows={br} must be a multiple of "
                     f"{mc.sublanes(x.dtype)} for {x.dtype}")
  xp = mc.pad_to(xt.reshape(rows, cols), (mc.round_up(rows, br), cols_p), -jnp.inf)
  out = _softmax2(xp, float(scale), br, bool(interpret))[:rows, :cols].reshape(xt.shape)
  return jnp.moveaxis(out, moved, axes) if axes != moved else out

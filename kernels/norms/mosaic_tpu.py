"""Layer norm and RMS norm as Pallas TPU (Mosaic) kernels, forward and backward.

``x`` is viewed as ``[n, d]``, padded inside the op to ``[n_p, d_p]`` (``d_p`` a multiple
of 128 lanes, ``n_p`` a multiple of the row block) and normalised over the first ``d``
columns; statistics are float32. Each grid step holds ``block_rows`` whole rows in VMEM.

* Forward: writes ``y`` and per-row ``mean`` / ``rstd`` (``[n_p, 1]``) for the backward.
* Backward: one kernel per row block writes ``dx`` and that block's partial column sums
  ``sum(dy * xhat)`` and ``sum(dy)`` (``[blocks, 1, d_p]``), summed by XLA; the grid stays
  "parallel" so both TensorCores of a megacore chip share it.

With ``xhat = (x - mean) * rstd`` and ``wdy = dy * scale``:
``dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))`` (RMS norm: no centring, no
``mean(wdy)`` term). Padded columns have ``x = dy = scale = 0``, so they add nothing.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import mosaic_common as mc
from .. import pallas_common as pc

_F32 = jnp.float32


def _fwd_kernel(*refs, d, eps, centered):
  if centered:
    x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref = refs
  else:
    x_ref, w_ref, y_ref, rstd_ref = refs
  x = x_ref[...].astype(_F32)
  if centered:
    mean = jnp.sum(x, axis=1, keepdims=True) / d
    cols = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    x = jnp.where(cols < d, x - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)
  y = x * rstd * w_ref[...].astype(_F32)
  if centered:
    y = y + b_ref[...].astype(_F32)
    mean_ref[...] = mean
  y_ref[...] = y.astype(y_ref.dtype)
  rstd_ref[...] = rstd


def _bwd_kernel(*refs, d, centered):
  if centered:
    x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref = refs
  else:
    x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref = refs
  x = x_ref[...].astype(_F32)
  dy = dy_ref[...].astype(_F32)
  rstd = rstd_ref[...]
  xc = x - mean_ref[...] if centered else x
  cols = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  xhat = jnp.where(cols < d, xc * rstd, 0.0)
  wdy = dy * w_ref[...].astype(_F32)
  dx = wdy - xhat * (jnp.sum(xhat * wdy, axis=1, keepdims=True) / d)
  if centered:
    dx = dx - jnp.sum(wdy, axis=1, keepdims=True) / d
  dx_ref[...] = (dx * rstd).astype(dx_ref.dtype)
  dw_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)[None]
  if centered:
    db_ref[...] = jnp.sum(dy, axis=0, keepdims=True)[None]


def _geometry(n, d, dtype, block_rows=None):
  d_p = mc.round_up(d, mc.LANES)
  br = block_rows or mc.row_block(n, d_p, dtype)
  if br % mc.sublanes(dtype):
    raise ValueError(f"norms mosaic_tpu: block_rows={br} must be a multiple of "
                     f"{mc.sublanes(dtype)} for {jnp.dtype(dtype).name}")
  return br, mc.round_up(n, br), d_p


def forward(x2, w, b, *, eps: float, block_rows=None, interpret: bool = False):
  """``(y, mean, rstd)`` on ``[n, d]`` (``mean`` is None for RMS norm, ``b is None``)."""
  n, d = x2.shape
  centered = b is not None
  br, n_p, d_p = _geometry(n, d, x2.dtype, block_rows)
  xp = mc.pad_to(x2, (n_p, d_p))
  vecs = [mc.pad_to(v.reshape(1, d), (1, d_p)) for v in ((w, b) if centered else (w,))]
  row = pl.BlockSpec((br, d_p), lambda i: (i, 0))
  vec = pl.BlockSpec((1, d_p), lambda i: (0, 0))
  stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
  n_stats = 2 if centered else 1
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, d=d, eps=eps, centered=centered),
      grid=(n_p // br,), in_specs=[row] + [vec] * len(vecs), out_specs=[row] + [stat] * n_stats,
      out_shape=[pc.out_struct((n_p, d_p), x2.dtype, xp, *vecs)]
      + [pc.out_struct((n_p, 1), _F32, xp, *vecs)] * n_stats,
      compiler_params=mc.compiler_params("parallel"), interpret=mc.interpret_mode(interpret),
      name="layer_norm_fwd" if centered else "rms_norm_fwd",
  )(xp, *vecs)
  y = outs[0][:n, :d]
  if centered:
    return y, outs[1], outs[2]
  return y, None, outs[1]


def backward(x2, w, dy, mean, rstd, *, block_rows=None, interpret: bool = False):
  """``(dx, dscale_f32, doffset_f32 or None)``; ``mean``/``rstd`` as ``forward`` returned."""
  n, d = x2.shape
  centered = mean is not None
  br, n_p, d_p = _geometry(n, d, x2.dtype, block_rows)
  blocks = n_p // br
  xp, dyp = mc.pad_to(x2, (n_p, d_p)), mc.pad_to(dy, (n_p, d_p))
  wp = mc.pad_to(w.reshape(1, d), (1, d_p))
  row = pl.BlockSpec((br, d_p), lambda i: (i, 0))
  vec = pl.BlockSpec((1, d_p), lambda i: (0, 0))
  stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
  part = pl.BlockSpec((1, 1, d_p), lambda i: (i, 0, 0))
  stats = (mean, rstd) if centered else (rstd,)
  n_parts = 2 if centered else 1
  dx, *parts = pl.pallas_call(
      functools.partial(_bwd_kernel, d=d, centered=centered),
      grid=(blocks,), in_specs=[row, vec, row] + [stat] * len(stats),
      out_specs=[row] + [part] * n_parts,
      out_shape=[pc.out_struct((n_p, d_p), x2.dtype, xp, wp, dyp, *stats)]
      + [pc.out_struct((blocks, 1, d_p), _F32, xp, wp, dyp, *stats)] * n_parts,
      compiler_params=mc.compiler_params("parallel"), interpret=mc.interpret_mode(interpret),
      name="layer_norm_bwd" if centered else "rms_norm_bwd",
  )(xp, wp, dyp, *stats)
  dw = jnp.sum(parts[0], axis=(0, 1))[:d]
  db = jnp.sum(parts[1], axis=(0, 1))[:d] if centered else None
  return dx[:n, :d], dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm2(x2, w, b, eps, block_rows, interpret):
  return forward(x2, w, b, eps=eps, block_rows=block_rows, interpret=interpret)[0]


def _norm2_fwd(x2, w, b, eps, block_rows, interpret):
  y, mean, rstd = forward(x2, w, b, eps=eps, block_rows=block_rows, interpret=interpret)
  return y, (x2, w, b, mean, rstd)


def _norm2_bwd(eps, block_rows, interpret, res, dy):
  x2, w, b, mean, rstd = res
  dx, dw, db = backward(x2, w, dy.astype(x2.dtype), mean, rstd, block_rows=block_rows,
                        interpret=interpret)
  return dx, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_norm2.defvjp(_norm2_fwd, _norm2_bwd)


def _run(x, scale, offset, eps, interpret, config, centered):
  d = x.shape[-1]
  n = math.prod(x.shape[:-1])
  block_rows = None if config is None else config.get("block_rows")
  w = jnp.ones((d,), x.dtype) if scale is None else scale
  b = None
  if centered:
    b = jnp.zeros((d,), x.dtype) if offset is None else offset
  y = _norm2(x.reshape(n, d), w, b, float(eps), block_rows, bool(interpret))
  return y.reshape(x.shape)


def layer_norm(x, scale, offset, *, epsilon=1e-6, interpret=False, config=None):
  """Layer norm over the last axis with Pallas TPU kernels (``config={"block_rows": r}``)."""
  return _run(x, scale, offset, epsilon, interpret, config, centered=True)


def rms_norm(x, scale, *, epsilon=1e-6, interpret=False, config=None):
  """RMS norm over the last axis with Pallas TPU kernels (``config={"block_rows": r}``)."""
  return _run(x, scale, None, epsilon, interpret, config, centered=False)

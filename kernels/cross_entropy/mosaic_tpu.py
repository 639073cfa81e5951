"""Linear cross-entropy as Pallas TPU (Mosaic) kernels; the ``[N, V]`` logits never reach HBM.

Operands are padded inside the op: ``D`` and the vocabulary to multiples of 128 lanes (the
vocabulary to whole ``block_v`` blocks), tokens to whole ``block_n`` blocks; padded columns
are masked out of the log-sum-exp and padded tokens get zero cotangent.

* Forward, grid ``(N / block_n, V / block_v)``, vocabulary innermost ("arbitrary"): each
  step computes the ``[block_n, block_v]`` logits tile ``x_blk @ w_blk`` on the MXU (float32
  accumulation) and folds it into an online max/sum, the label logit and the logit sum held
  in VMEM scratch; the last step writes ``lse``, the label logit and the logit sum per token.
* Backward (TPUs have no atomics): a ``dx`` kernel over ``(token block, vocab block)``
  accumulating ``dlogits @ w_blk^T`` and a ``dweight`` kernel over ``(vocab block, token
  block)`` accumulating ``x_blk^T @ dlogits``, each recomputing its logits tile from the saved
  ``lse``. Accumulation is float32 and deterministic.

Per-token statistics travel lane-replicated (``[N_p, 128]``), the layout Mosaic keeps row
statistics in.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import mosaic_common as mc
from .. import pallas_common as pc
from .reference import loss_from_stats

_F32 = jnp.float32
_LANES = mc.LANES
# Default tiles, largest first: the first whose VMEM footprint fits VMEM_BUDGET wins.
TILE_CHOICES = ((256, 512), (256, 256), (128, 256), (128, 128))
VMEM_BUDGET = 12 << 20  # under the 16 MiB scoped-VMEM default of v5e (the smallest)


def _vmem_bytes(bn, bv, d_p, itemsize):
  """x and w blocks (double-buffered), the float32 dx/dw accumulators and logits temporaries."""
  return (2 * (bn * d_p + d_p * bv) * itemsize + max(bn, bv) * d_p * 4 + 3 * bn * bv * 4)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _lanes(x):
  return jnp.broadcast_to(x, (x.shape[0], _LANES))


def _tile(x_ref, w_ref, lab_ref, j, *, v, bv, precision):
  """Logits tile ``[bn, bv]`` (float32), its column ids, the in-vocabulary mask, label hits."""
  z = lax.dot_general(x_ref[...], w_ref[...], (((1,), (0,)), ((), ())), precision=precision,
                      preferred_element_type=_F32)
  cols = j * bv + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  return z, cols < v, cols == lab_ref[:, 0:1]


def _fwd_kernel(x_ref, w_ref, lab_ref, lse_ref, ll_ref, sl_ref, m_scr, s_scr, ll_scr, sl_scr,
                *, v, bv, nv, smoothing, precision):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    for ref in (s_scr, ll_scr, sl_scr):
      ref[...] = jnp.zeros(ref.shape, _F32)

  z, ok, hit = _tile(x_ref, w_ref, lab_ref, j, v=v, bv=bv, precision=precision)
  zm = jnp.where(ok, z, -jnp.inf)
  m_prev = m_scr[:, 0:1]
  m_new = jnp.maximum(m_prev, jnp.max(zm, axis=1, keepdims=True))
  s = s_scr[:, 0:1] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(zm - m_new), axis=1,
                                                         keepdims=True)
  m_scr[...] = _lanes(m_new)
  s_scr[...] = _lanes(s)
  ll_scr[...] += _lanes(jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True))
  if smoothing:
    sl_scr[...] += _lanes(jnp.sum(jnp.where(ok, z, 0.0), axis=1, keepdims=True))

  @pl.when(j == nv - 1)
  def _finish():
    lse_ref[...] = m_scr[...] + jnp.log(s_scr[...])
    ll_ref[...] = ll_scr[...]
    sl_ref[...] = sl_scr[...]


def _dlogits(x_ref, w_ref, lab_ref, lse_ref, gs_ref, j, *, v, bv, smoothing, z_loss,
             precision):
  z, ok, hit = _tile(x_ref, w_ref, lab_ref, j, v=v, bv=bv, precision=precision)
  lse, gs = lse_ref[:, 0:1], gs_ref[:, 0:1]
  dz = jnp.exp(z - lse) * ((1.0 + 2.0 * z_loss * lse) * gs)
  dz = dz - jnp.where(hit, (1.0 - smoothing) * gs, 0.0)
  if smoothing:
    dz = dz - (smoothing / v) * gs
  return jnp.where(ok, dz, 0.0).astype(x_ref.dtype)


def _dx_kernel(x_ref, w_ref, lab_ref, lse_ref, gs_ref, dx_ref, acc_scr, *, nv, precision,
               **kw):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  dz = _dlogits(x_ref, w_ref, lab_ref, lse_ref, gs_ref, j, precision=precision, **kw)
  acc_scr[...] += lax.dot_general(dz, w_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                                  preferred_element_type=_F32)

  @pl.when(j == nv - 1)
  def _finish():
    dx_ref[...] = acc_scr[...]


def _dw_kernel(x_ref, w_ref, lab_ref, lse_ref, gs_ref, dw_ref, acc_scr, *, nn, precision,
               **kw):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  dz = _dlogits(x_ref, w_ref, lab_ref, lse_ref, gs_ref, j, precision=precision, **kw)
  acc_scr[...] += lax.dot_general(x_ref[...].T, dz, (((1,), (0,)), ((), ())),
                                  precision=precision, preferred_element_type=_F32)

  @pl.when(i == nn - 1)
  def _finish():
    dw_ref[...] = acc_scr[...]


def _geometry(n, d, v, config, itemsize=4):
  d_p = mc.round_up(d, _LANES)
  fits = [t for t in TILE_CHOICES if _vmem_bytes(*t, d_p, itemsize) <= VMEM_BUDGET]
  bn, bv = fits[0] if fits else TILE_CHOICES[-1]
  cfg = {"block_n": bn, "block_v": bv, **(config or {})}
  bn = min(int(cfg["block_n"]), mc.round_up(n, _LANES))
  bv = min(int(cfg["block_v"]), mc.round_up(v, _LANES))
  for name, b in (("block_n", bn), ("block_v", bv)):
    if b < _LANES or b % _LANES:
      raise ValueError(f"linear_cross_entropy mosaic_tpu: {name}={b} must be a positive "
                       f"multiple of {_LANES}")
  return bn, bv, mc.round_up(n, bn), d_p, mc.round_up(v, bv)


def _padded(x, w, labels, geometry):
  bn, bv, n_p, d_p, v_p = geometry
  lab = jnp.broadcast_to(mc.pad_to(labels, (n_p,), -1)[:, None], (n_p, _LANES))
  return mc.pad_to(x, (n_p, d_p)), mc.pad_to(w, (d_p, v_p)), lab


def forward(x, w, labels, *, smoothing: float, config=None, interpret: bool = False):
  """Per-token ``(lse, label_logit, logit_sum)`` in float32, each ``[N]``."""
  n, d = x.shape
  v = w.shape[1]
  geo = _geometry(n, d, v, config, x.dtype.itemsize)
  bn, bv, n_p, d_p, v_p = geo
  xp, wp, lab = _padded(x, w, labels, geo)
  row = pl.BlockSpec((bn, _LANES), lambda i, j: (i, 0))
  stat = pc.out_struct((n_p, _LANES), _F32, xp, wp)
  lse, ll, sl = pl.pallas_call(
      functools.partial(_fwd_kernel, v=v, bv=bv, nv=v_p // bv, smoothing=bool(smoothing),
                        precision=_precision(x.dtype)),
      grid=(n_p // bn, v_p // bv),
      in_specs=[pl.BlockSpec((bn, d_p), lambda i, j: (i, 0)),
                pl.BlockSpec((d_p, bv), lambda i, j: (0, j)), row],
      out_specs=[row] * 3, out_shape=[stat] * 3,
      scratch_shapes=[pltpu.VMEM((bn, _LANES), _F32) for _ in range(4)],
      compiler_params=mc.compiler_params("parallel", "arbitrary"),
      interpret=mc.interpret_mode(interpret), name="linear_cross_entropy_fwd_tpu",
  )(xp, wp, lab)
  return lse[:n, 0], ll[:n, 0], sl[:n, 0]


def backward(x, w, labels, lse, gs, *, smoothing: float, z_loss: float, config=None,
             interpret: bool = False):
  """``(dx, dweight)`` in float32 for per-token cotangents ``gs`` (0 for ignored tokens)."""
  n, d = x.shape
  v = w.shape[1]
  geo = _geometry(n, d, v, config, x.dtype.itemsize)
  bn, bv, n_p, d_p, v_p = geo
  nn, nv = n_p // bn, v_p // bv
  xp, wp, lab = _padded(x, w, labels, geo)
  lse_p = jnp.broadcast_to(mc.pad_to(lse, (n_p,))[:, None], (n_p, _LANES))
  gs_p = jnp.broadcast_to(mc.pad_to(gs, (n_p,))[:, None], (n_p, _LANES))
  kw = dict(v=v, bv=bv, smoothing=float(smoothing), z_loss=float(z_loss),
            precision=_precision(x.dtype))
  interp = mc.interpret_mode(interpret)

  row = pl.BlockSpec((bn, _LANES), lambda i, j: (i, 0))
  x_spec = pl.BlockSpec((bn, d_p), lambda i, j: (i, 0))
  dx = pl.pallas_call(
      functools.partial(_dx_kernel, nv=nv, **kw),
      grid=(nn, nv),
      in_specs=[x_spec, pl.BlockSpec((d_p, bv), lambda i, j: (0, j)), row, row, row],
      out_specs=x_spec, out_shape=pc.out_struct((n_p, d_p), _F32, xp, wp, gs_p),
      scratch_shapes=[pltpu.VMEM((bn, d_p), _F32)],
      compiler_params=mc.compiler_params("parallel", "arbitrary"), interpret=interp,
      name="linear_cross_entropy_dx_tpu",
  )(xp, wp, lab, lse_p, gs_p)

  row_t = pl.BlockSpec((bn, _LANES), lambda j, i: (i, 0))
  w_spec = pl.BlockSpec((d_p, bv), lambda j, i: (0, j))
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, nn=nn, **kw),
      grid=(nv, nn),
      in_specs=[pl.BlockSpec((bn, d_p), lambda j, i: (i, 0)), w_spec, row_t, row_t, row_t],
      out_specs=w_spec, out_shape=pc.out_struct((d_p, v_p), _F32, xp, wp, gs_p),
      scratch_shapes=[pltpu.VMEM((d_p, bv), _F32)],
      compiler_params=mc.compiler_params("parallel", "arbitrary"), interpret=interp,
      name="linear_cross_entropy_dweight_tpu",
  )(xp, wp, lab, lse_p, gs_p)
  return dx[:n, :d], dw[:d, :v]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _lce(x, w, labels, ignore_index, smoothing, z_loss, config, interpret):
  return _lce_fwd(x, w, labels, ignore_index, smoothing, z_loss, config, interpret)[0]


def _lce_fwd(x, w, labels, ignore_index, smoothing, z_loss, config, interpret):
  cfg = dict(config) if config else None
  lse, ll, sl = forward(x, w, labels, smoothing=smoothing, config=cfg, interpret=interpret)
  loss = loss_from_stats(lse, ll, sl, labels != ignore_index, vocab=w.shape[1],
                         label_smoothing=smoothing, z_loss=z_loss)
  return loss, (x, w, labels, lse)


def _lce_bwd(ignore_index, smoothing, z_loss, config, interpret, res, g):
  x, w, labels, lse = res
  gs = jnp.where(labels != ignore_index, g.astype(_F32), 0.0)
  dx, dw = backward(x, w, labels, lse, gs, smoothing=smoothing, z_loss=z_loss,
                    config=dict(config) if config else None, interpret=interpret)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_lce.defvjp(_lce_fwd, _lce_bwd)


def per_token_loss(x, weight, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   interpret=False, config=None):
  """``[N]`` float32 losses (0 for ignored tokens) with Pallas TPU kernels.

  ``config={"block_n": 256, "block_v": 512}`` (multiples of 128) sets the tiles; by default
  the largest of ``TILE_CHOICES`` whose VMEM footprint fits ``VMEM_BUDGET`` (a whole row of
  ``x``, ``D`` wide, sits in VMEM: very wide ``D`` needs more VMEM than these tiles assume).
  """
  frozen = None if config is None else tuple(sorted(dict(config).items()))
  return _lce(x, weight, labels.astype(jnp.int32), int(ignore_index), float(label_smoothing),
              float(z_loss), frozen, bool(interpret))

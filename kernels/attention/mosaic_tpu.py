"""``implementation="mosaic_tpu"``: flash attention as Pallas TPU (Mosaic) kernels.

Layout: the op transposes to head-major ``q [B, N, Tp, Dp]``, ``k/v [B, K, Sp, Dp]`` (the
last two block dims must be multiples of (8, 128) on TPU) and zero-pads: ``Dp`` to a multiple
of 128 lanes, ``Tp``/``Sp`` to whole blocks (padded keys are hidden by position, padded query
rows are sliced off). Three kernels, each with the key (or query) walk as the innermost,
"arbitrary" grid axis and float32 accumulators in VMEM scratch, the TPU way:
  * forward, grid ``(B, N, Tp / block_q, Sp / block_k)``: online softmax; writes the output and
    the log-sum-exp ``lse`` (``[B, N, Tp, 128]``, lane-replicated, as Mosaic wants columns);
  * dq, grid ``(B, N, Tp / block_q, Sp / block_k)``: recomputes ``p = exp(s - lse)``,
    ``ds = p (do v^T - rowsum(o do))`` and accumulates ``dq = scale * ds k``;
  * dk/dv, grid ``(B, K, Sp / block_k, group, Tp / block_q)``: one key block accumulates over
    the query heads of its group (GQA/MQA) and the query blocks.
Causal / sliding-window blocks that are fully hidden are skipped twice over: the body runs
under ``pl.when`` and the index maps clamp the block index to the visible range, so a skipped
step re-uses the block already in VMEM (no DMA). Segment ids travel lane-broadcast
(``[B, Tp, 128]``) and sublane-broadcast (``[B, 8, Sp]``); a boolean mask as int8 tiles.
A dense ``bias`` is not supported (``unsupported_reason`` says so; ``implementation=None``
then falls back to "xla_chunked" with a one-time warning).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import mosaic_common as mc
from .. import pallas_common as pc
from . import common

SUPPORTED_DTYPES = ("float32", "bfloat16")
MAX_HEAD_DIM = 512
_LANES = mc.LANES
_SEG_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles: multiples of 128 (rows of q / k blocks; the transposes in the backward want
  square-ish 128-multiples on the MXU)."""
  block_q: int = 256
  block_k: int = 512

  def fit(self, q_len: int, kv_len: int) -> "BlockSizes":
    return BlockSizes(block_q=min(self.block_q, mc.round_up(q_len, _LANES)),
                      block_k=min(self.block_k, mc.round_up(kv_len, _LANES)))

  def validate(self):
    for f in ("block_q", "block_k"):
      x = getattr(self, f)
      if x < _LANES or x % _LANES:
        raise ValueError(f"mosaic_tpu attention: BlockSizes.{f}={x} must be a positive "
                         f"multiple of {_LANES}")


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  window: common.Window
  soft_cap: float | None
  kv_len: int
  kv_padded: bool
  groups: int
  block_q: int
  block_k: int
  num_q_blocks: int
  num_k_blocks: int
  mask_bcast: tuple | None   # (batch>1, heads>1, T>1, S>1) of the mask, or None
  has_seg: bool
  interpret: bool


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nt(a, b, precision):
  """``a @ b^T`` with float32 accumulation (contract the last dims)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _dot(a, b, precision):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _clamp(i, lo, hi, n):
  """Block index ``i`` clamped into the visible range ``[lo, hi)`` (and ``[0, n)``)."""
  return jnp.clip(jnp.clip(i, lo, jnp.maximum(hi - 1, lo)), 0, n - 1)


def _kv_range(c: _Static, i):
  return common.kv_block_range(i * c.block_q, (i + 1) * c.block_q, c.window, c.block_k,
                               c.num_k_blocks)


def _q_range(c: _Static, j):
  return common.q_block_range(j * c.block_k, (j + 1) * c.block_k, c.window, c.block_q,
                              c.num_q_blocks)


def _visible(c: _Static, i, j, mask_ref, qseg_ref, kseg_ref):
  """Boolean ``[bq, bk]`` of visible (query, key) pairs in tile (i, j), or None: all visible."""
  shape = (c.block_q, c.block_k)
  q_pos = i * c.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = j * c.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  w = c.window
  vis = []
  if w.right is not None:
    vis.append(k_pos <= q_pos + w.right)
  if w.left is not None:
    vis.append(k_pos >= q_pos - w.left)
  if c.kv_padded:
    vis.append(k_pos < c.kv_len)
  if mask_ref is not None:
    vis.append(mask_ref[...] != 0)
  if c.has_seg:
    vis.append(qseg_ref[:, 0:1] == kseg_ref[0:1, :])
  return common.and_masks(*vis)


def _logits(q, k, c: _Static, vis, precision):
  """Masked logits ``[bq, bk]`` and the capped logits before masking."""
  s = common.transform_logits(_dot_nt(q, k, precision), scale=c.scale, soft_cap=c.soft_cap)
  return common.apply_mask(s, vis), s


def _split(refs, c: _Static):
  refs = list(refs)
  mask = refs.pop(0) if c.mask_bcast is not None else None
  qseg = refs.pop(0) if c.has_seg else None
  kseg = refs.pop(0) if c.has_seg else None
  return mask, qseg, kseg, refs


def _lanes(x):
  """A ``[rows, 1]`` column replicated over 128 lanes (how Mosaic stores row statistics)."""
  return jnp.broadcast_to(x, (x.shape[0], _LANES))


# --- Forward ----------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, *refs, c: _Static, precision):
  mask_ref, qseg_ref, kseg_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split(refs, c)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  lo, hi = _kv_range(c, i)

  @pl.when((j >= lo) & (j < hi))
  def _body():
    s, _ = _logits(q_ref[...], k_ref[...], c, _visible(c, i, j, mask_ref, qseg_ref, kseg_ref),
                   precision)
    m_prev, l_prev = m_scr[:, 0:1], l_scr[:, 0:1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = common.safe_max(m_new)
    correction = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_scr[...] = _lanes(l_prev * correction + jnp.sum(p, axis=1, keepdims=True))
    m_scr[...] = _lanes(m_new)
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * correction + _dot(p.astype(v.dtype), v, precision)

  @pl.when(j == c.num_k_blocks - 1)
  def _finish():
    l = l_scr[:, 0:1]
    o_ref[...] = (acc_scr[...] * common.safe_reciprocal(l)).astype(o_ref.dtype)
    lse_ref[...] = _lanes(common.finalize_lse(m_scr[:, 0:1], l))


def _mask_spec(c: _Static, head_and_blocks):
  """BlockSpec of the int8 mask ``[B|1, N|1, Tp|1, Sp|1]``; ``head_and_blocks(*grid_idx)``
  gives ``(batch, head, q block, k block)`` for a grid point."""
  b_full, n_full, t_full, s_full = c.mask_bcast

  def index_map(*idx):
    b, h, i, j = head_and_blocks(*idx)
    return (b if b_full else 0, h if n_full else 0, i if t_full else 0, j if s_full else 0)

  return pl.BlockSpec((None, None, c.block_q if t_full else 1, c.block_k if s_full else 1),
                      index_map)


def _extra(mask, qseg, kseg, c: _Static, head_and_blocks):
  """Optional inputs (mask, segment ids) and their BlockSpecs."""
  arrays, specs = [], []
  if mask is not None:
    arrays.append(mask)
    specs.append(_mask_spec(c, head_and_blocks))
  if qseg is not None:
    arrays += [qseg, kseg]
    specs += [
        pl.BlockSpec((None, c.block_q, _LANES),
                     lambda *idx: (head_and_blocks(*idx)[0], head_and_blocks(*idx)[2], 0)),
        pl.BlockSpec((None, _SEG_SUBLANES, c.block_k),
                     lambda *idx: (head_and_blocks(*idx)[0], 0, head_and_blocks(*idx)[3])),
    ]
  return arrays, specs


def _q_major_blocks(c: _Static):
  """For grids ``(b, h, i, j)`` walking keys innermost: key block clamped to the visible range."""
  def blocks(b, h, i, j):
    lo, hi = _kv_range(c, i)
    return b, h, i, _clamp(j, lo, hi, c.num_k_blocks)
  return blocks


def _forward(q, k, v, mask, qseg, kseg, c: _Static):
  """q ``[B, N, Tp, Dp]``, k/v ``[B, K, Sp, Dp]`` -> out ``[B, N, Tp, Dp]``, lse
  ``[B, N, Tp, 128]``."""
  b, n, tp, d = q.shape
  g = c.groups
  blocks = _q_major_blocks(c)
  extra, extra_specs = _extra(mask, qseg, kseg, c, blocks)
  q_spec = pl.BlockSpec((None, None, c.block_q, d), lambda b_, h, i, j: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, c.block_k, d),
                         lambda b_, h, i, j: (b_, lax.div(h, g), blocks(b_, h, i, j)[3], 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, precision=_precision(q.dtype)),
      grid=(b, n, c.num_q_blocks, c.num_k_blocks),
      in_specs=[q_spec, kv_spec, kv_spec] + extra_specs,
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, c.block_q, _LANES), lambda b_, h, i, j: (b_, h, i, 0))],
      out_shape=[pc.out_struct(q.shape, q.dtype, q, k, v),
                 pc.out_struct((b, n, tp, _LANES), jnp.float32, q, k, v)],
      scratch_shapes=[pltpu.VMEM((c.block_q, _LANES), jnp.float32),
                      pltpu.VMEM((c.block_q, _LANES), jnp.float32),
                      pltpu.VMEM((c.block_q, d), jnp.float32)],
      compiler_params=mc.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=mc.interpret_mode(c.interpret),
      name="flash_attention_fwd_tpu",
  )(q, k, v, *extra)


# --- Backward ---------------------------------------------------------------------------------

def _ds_tile(q, k, v, o, do, lse, vis, c: _Static, precision):
  """Recomputes tile probabilities ``p`` and ``ds`` = d loss / d logits (before the scale)."""
  s, capped = _logits(q, k, c, vis, precision)
  p = jnp.exp(s - lse)  # lse = +inf on rows with nothing visible: p = 0 there
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1, keepdims=True)
  ds = p * (_dot_nt(do, v, precision) - delta)
  cap_grad = common.soft_cap_grad(capped, c.soft_cap)
  if cap_grad is not None:
    ds = ds * cap_grad
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, *refs, c: _Static, precision):
  mask_ref, qseg_ref, kseg_ref, (dq_ref, dq_scr) = _split(refs, c)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  lo, hi = _kv_range(c, i)

  @pl.when((j >= lo) & (j < hi))
  def _body():
    k = k_ref[...]
    _, ds = _ds_tile(q_ref[...], k, v_ref[...], o_ref[...], do_ref[...], lse_ref[:, 0:1],
                     _visible(c, i, j, mask_ref, qseg_ref, kseg_ref), c, precision)
    dq_scr[...] += _dot(ds.astype(k.dtype), k, precision)

  @pl.when(j == c.num_k_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * c.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, *refs, c: _Static, precision):
  mask_ref, qseg_ref, kseg_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split(refs, c)
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((gi == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  lo, hi = _q_range(c, j)

  @pl.when((i >= lo) & (i < hi))
  def _body():
    q, do = q_ref[...], do_ref[...]
    p, ds = _ds_tile(q, k_ref[...], v_ref[...], o_ref[...], do, lse_ref[:, 0:1],
                     _visible(c, i, j, mask_ref, qseg_ref, kseg_ref), c, precision)
    dv_scr[...] += _dot(p.astype(do.dtype).T, do, precision)
    dk_scr[...] += _dot(ds.astype(q.dtype).T, q, precision)

  @pl.when((gi == c.groups - 1) & (i == c.num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(q, k, v, mask, qseg, kseg, out, lse, do, c: _Static):
  b, n, tp, d = q.shape
  kh = k.shape[1]
  g = c.groups
  precision = _precision(q.dtype)
  row_in = (q, k, v, out, do, lse)

  # dq: grid (b, h, q block, k block), keys innermost.
  blocks = _q_major_blocks(c)
  extra, extra_specs = _extra(mask, qseg, kseg, c, blocks)
  q_spec = pl.BlockSpec((None, None, c.block_q, d), lambda b_, h, i, j: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, c.block_k, d),
                         lambda b_, h, i, j: (b_, lax.div(h, g), blocks(b_, h, i, j)[3], 0))
  lse_spec = pl.BlockSpec((None, None, c.block_q, _LANES), lambda b_, h, i, j: (b_, h, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, c=c, precision=precision),
      grid=(b, n, c.num_q_blocks, c.num_k_blocks),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, q_spec, lse_spec] + extra_specs,
      out_specs=q_spec,
      out_shape=pc.out_struct(q.shape, q.dtype, *row_in),
      scratch_shapes=[pltpu.VMEM((c.block_q, d), jnp.float32)],
      compiler_params=mc.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=mc.interpret_mode(c.interpret),
      name="flash_attention_dq_tpu",
  )(*row_in, *extra)

  # dk, dv: grid (b, kv head, k block, query head in group, q block), the last two innermost.
  def kv_blocks(b_, kh_, j, gi, i):
    lo, hi = _q_range(c, j)
    return b_, kh_ * g + gi, _clamp(i, lo, hi, c.num_q_blocks), j

  extra, extra_specs = _extra(mask, qseg, kseg, c, kv_blocks)

  def row_spec(width):
    def index_map(*idx):
      b_, h, i, _ = kv_blocks(*idx)
      return b_, h, i, 0
    return pl.BlockSpec((None, None, c.block_q, width), index_map)

  key_spec = pl.BlockSpec((None, None, c.block_k, d), lambda b_, kh_, j, gi, i: (b_, kh_, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, c=c, precision=precision),
      grid=(b, kh, c.num_k_blocks, g, c.num_q_blocks),
      in_specs=[row_spec(d), key_spec, key_spec, row_spec(d), row_spec(d), row_spec(_LANES)]
      + extra_specs,
      out_specs=[key_spec, key_spec],
      out_shape=[pc.out_struct(k.shape, k.dtype, *row_in),
                 pc.out_struct(v.shape, v.dtype, *row_in)],
      scratch_shapes=[pltpu.VMEM((c.block_k, d), jnp.float32),
                      pltpu.VMEM((c.block_k, d), jnp.float32)],
      compiler_params=mc.compiler_params("parallel", "parallel", "parallel", "arbitrary",
                                         "arbitrary"),
      interpret=mc.interpret_mode(c.interpret),
      name="flash_attention_dkdv_tpu",
  )(*row_in, *extra)
  return dq, dk, dv


_flash = common.flash_with_vjp(_forward, _backward)




def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False,
              block_sizes: BlockSizes | None = None):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  mask ``[B|1, N|1, T|1, S|1]`` boolean, segment ids ``[B, T]`` / ``[B, S]`` int32.
  ``interpret``: run in Pallas's TPU interpreter (CPU tests of the TPU kernels).
  """
  if bias is not None:
    raise ValueError("mosaic_tpu attention does not support a dense bias; use "
                     "implementation=None (falls back) or 'xla_chunked'")
  b, t, n, d = query.shape
  s_len, kh = key.shape[1], key.shape[2]
  bs = (block_sizes or BlockSizes()).fit(t, s_len)
  bs.validate()
  dp = mc.round_up(d, _LANES)
  tp, sp = mc.round_up(t, bs.block_q), mc.round_up(s_len, bs.block_k)
  pad = common.pad_axis
  head_major = lambda x, length: pad(pad(jnp.swapaxes(x, 1, 2), 3, dp), 2, length)
  q, k, v = head_major(query, tp), head_major(key, sp), head_major(value, sp)
  if mask is not None:
    mask = common.pad_axis(common.pad_axis(mask.astype(jnp.int8), 2, tp, broadcast=True), 3, sp,
                           broadcast=True)
  qseg = kseg = None
  if query_segment_ids is not None:
    qseg = jnp.broadcast_to(common.pad_axis(query_segment_ids, 1, tp)[:, :, None], (b, tp, _LANES))
    kseg = jnp.broadcast_to(common.pad_axis(kv_segment_ids, 1, sp)[:, None, :],
                            (b, _SEG_SUBLANES, sp))
  c = _Static(scale=float(scale), window=window, soft_cap=soft_cap, kv_len=s_len,
              kv_padded=sp != s_len, groups=n // kh, block_q=bs.block_q, block_k=bs.block_k,
              num_q_blocks=tp // bs.block_q, num_k_blocks=sp // bs.block_k,
              mask_bcast=None if mask is None else tuple(a > 1 for a in mask.shape),
              has_seg=qseg is not None, interpret=bool(interpret))
  out = _flash(c, q, k, v, mask, qseg, kseg)
  return jnp.swapaxes(out[:, :, :t, :d], 1, 2)


def unsupported_reason(args) -> str | None:
  """Why this kernel cannot serve ``args`` (an ``AttentionArgs``), or None."""
  if args.has_bias:
    return "a dense bias is not supported by the TPU kernel"
  if args.dtype not in SUPPORTED_DTYPES:
    return f"dtype {args.dtype} is not one of {', '.join(SUPPORTED_DTYPES)}"
  if args.head_dim > MAX_HEAD_DIM:
    return f"head_dim {args.head_dim} > {MAX_HEAD_DIM}"
  return None

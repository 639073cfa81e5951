"""``implementation="triton"``: fused flash attention as Pallas kernels on the Triton backend.

Three kernels (one more when a bias needs a gradient), all taking block sizes as parameters:
  * forward, grid ``(T / block_q, batch, heads)``: one query block stays in registers while a
    ``fori_loop`` walks the visible key blocks with an online softmax in float32; writes the
    output and the log-sum-exp residual ``lse`` ``[B, N, T]``.
  * dq, grid ``(T / block_q_dq, batch, heads)``: recomputes ``p = exp(s - lse)`` block by block
    and accumulates ``dq = scale * sum_j ds_ij k_j``.
  * dk/dv, grid ``(S / block_k_dkv, batch, kv_heads)``: one key block in registers, loops over
    the group's query heads and the query blocks that can see it.
  * dbias (only when a bias is given), grid ``(T / block_q_dq, batch, heads)``: writes ``ds``.
Causal and sliding-window blocks that are fully hidden are never visited: the loops' bounds come
from ``common.kv_block_range`` / ``common.q_block_range``.

Triton wants power-of-two tiles: head_dim is zero-padded to a power of two (>= 16, the smallest
``tl.dot``), ragged T and S are zero-padded to whole blocks and padded keys are masked by
position. Padding happens outside the ``custom_vjp``, so JAX differentiates it for free.

JAX deprecates the Pallas Triton backend from 0.11 (in favour of Mosaic GPU and jax-triton);
this file is one entry of the implementation table, and a successor can sit beside it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from . import common
from .. import pallas_common as pc

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
MAX_HEAD_DIM = 256
_MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two >= 16) and launch parameters; tune per GPU and shape."""
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int | None = None   # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2

  @classmethod
  def default(cls, q_len: int, kv_len: int, head_dim: int, dtype) -> "BlockSizes":
    """Heuristic tiles from shape and dtype.

    Shared memory (measured by compiling to sm_90 with triton 3.9): at most 128 KiB with 3
    pipeline stages at head_dim 128, so 3 stages only up to head_dim 64 and 2 beyond, which
    keeps every kernel under the 99 KiB of consumer GPUs (sm_86/89) as well as A100/H100.
    """
    d = max(_MIN_BLOCK, common.next_power_of_2(head_dim))
    wide = jnp.dtype(dtype).itemsize >= 4 or d > 128  # float32 or head_dim 256: half tiles
    fq, fk = (64, 32) if wide else (128, 64)
    bq, bk = (32, 32) if wide else (64, 64)
    return cls(block_q=fq, block_k=fk, block_q_dq=bq, block_k_dq=bk, block_q_dkv=bq,
               block_k_dkv=bk, num_warps=None, num_stages=3 if not wide and d <= 64 else 2)

  def fit(self, q_len: int, kv_len: int) -> "BlockSizes":
    """Shrinks tiles to the (power-of-two rounded) sequence lengths; short sequences get one
    block instead of mostly padding."""
    tq = max(_MIN_BLOCK, common.next_power_of_2(q_len))
    tk = max(_MIN_BLOCK, common.next_power_of_2(kv_len))
    return dataclasses.replace(
        self, block_q=min(self.block_q, tq), block_k=min(self.block_k, tk),
        block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, tk),
        block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, tk))

  def validate(self):
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
      x = getattr(self, f)
      if x < _MIN_BLOCK or x & (x - 1):
        raise ValueError(f"triton attention: BlockSizes.{f}={x} must be a power of two >= "
                         f"{_MIN_BLOCK}")


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  window: common.Window
  soft_cap: float | None
  q_len: int
  kv_len: int
  kv_padded: bool      # keys beyond kv_len exist (ragged S): mask them by position
  head_dim: int        # true head dim (the arrays carry the padded one)
  groups: int          # query heads per kv head
  blocks: BlockSizes
  bias_bcast: tuple | None   # (batch>1, heads>1, T>1, S>1) of the bias, or None
  mask_bcast: tuple | None
  interpret: bool


def _params(c: _Static, d: int):
  num_warps = c.blocks.num_warps or (4 if d <= 64 else 8)
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=c.blocks.num_stages)


def _precision(dtype):
  # float32 in, float32 accuracy out: without HIGHEST, Triton multiplies float32 as TF32.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, precision, *, ta=False, tb=False):
  """2-D matmul with float32 accumulation; ``ta``/``tb`` contract over a's rows / b's cols."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# --- Optional per-tile inputs (bias, mask, segment ids) --------------------------------------

def _bcast_spec(bcast, block_t: int, block_s: int, q_axis: int | None, k_axis: int | None,
                head_block: int | None):
  """BlockSpec of a ``[B|1, N|1, T|1, S|1]`` bias/mask for a grid ``(blocks, batch, heads)``.

  ``q_axis``/``k_axis``: the grid axis that walks query / key blocks (None: the block spans the
  whole padded axis). ``head_block``: None when the grid walks query heads (the head axis is
  squeezed), else the number of query heads per grid head (the dk/dv kernel's group).
  """
  b_full, n_full, t_full, s_full = bcast
  keep_head = n_full and head_block is not None
  shape = (None, head_block if keep_head else None, block_t if t_full else 1,
           block_s if s_full else 1)

  def index_map(*idx):
    ti = idx[q_axis] if (t_full and q_axis is not None) else 0
    si = idx[k_axis] if (s_full and k_axis is not None) else 0
    return (idx[1] if b_full else 0, idx[2] if n_full else 0, ti, si)

  return pl.BlockSpec(shape, index_map)


def _load_tile(ref, bcast, head, q_sl, k_sl):
  """Loads the ``[bq|1, bk|1]`` tile of a bias/mask block ``[heads?, T|1, S|1]``.

  ``head``: the index into a kept head axis (dk/dv kernel), else None.
  """
  _, n_full, t_full, s_full = bcast
  idx = (q_sl if t_full else slice(None), k_sl if s_full else slice(None))
  if head is not None and n_full:
    idx = (head,) + idx
  return ref[idx]


# --- Forward ----------------------------------------------------------------------------------

def _logits_tile(q, k, bias, mask, q_seg, k_seg, q_pos, k_pos, c: _Static, precision):
  """Masked logits ``[bq, bk]`` and the capped logits before masking."""
  s = _dot(q, k, precision, tb=True)
  s = common.transform_logits(s, scale=c.scale, bias=bias, soft_cap=c.soft_cap)
  visible = common.and_masks(
      common.position_mask(q_pos, k_pos, c.window, c.kv_len if c.kv_padded else None),
      None if mask is None else mask != 0,
      None if q_seg is None else common.segment_mask(q_seg, k_seg))
  return common.apply_mask(s, visible), s


def _split_refs(refs, c: _Static, has_seg: bool):
  refs = list(refs)
  bias = refs.pop(0) if c.bias_bcast is not None else None
  mask = refs.pop(0) if c.mask_bcast is not None else None
  qseg = refs.pop(0) if has_seg else None
  kseg = refs.pop(0) if has_seg else None
  return bias, mask, qseg, kseg, refs


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, c: _Static, has_seg: bool, precision):
  bias_ref, mask_ref, qseg_ref, kseg_ref, (o_ref, lse_ref) = _split_refs(refs, c, has_seg)
  bq, bk = c.blocks.block_q, c.blocks.block_k
  nk = k_ref.shape[0] // bk
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  q_pos = q_start + jnp.arange(bq)
  q_seg = None if qseg_ref is None else qseg_ref[...]
  lo, hi = common.kv_block_range(q_start, q_start + bq, c.window, bk, nk)

  def body(j, carry):
    acc, m, l = carry
    k_start = pl.multiple_of(j * bk, bk)
    k_sl = pl.ds(k_start, bk)
    s, _ = _logits_tile(
        q, k_ref[k_sl, :],
        None if bias_ref is None else _load_tile(bias_ref, c.bias_bcast, None, slice(None), k_sl),
        None if mask_ref is None else _load_tile(mask_ref, c.mask_bcast, None, slice(None), k_sl),
        q_seg, None if kseg_ref is None else kseg_ref[k_sl], q_pos, k_start + jnp.arange(bk),
        c, precision)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = common.safe_max(m_new)
    correction = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = l * correction + jnp.sum(p, axis=1)
    v = v_ref[k_sl, :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, precision)
    return acc, m_new, l

  d = q_ref.shape[-1]
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), common.MASKED, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc * common.safe_reciprocal(l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = common.finalize_lse(m, l)


def _extra_inputs(bias, mask, qseg, kseg, c: _Static, *, block_t, block_s, q_axis, k_axis,
                  head_block, qseg_spec, kseg_spec):
  arrays, specs = [], []
  if bias is not None:
    arrays.append(bias)
    specs.append(_bcast_spec(c.bias_bcast, block_t, block_s, q_axis, k_axis, head_block))
  if mask is not None:
    arrays.append(mask)
    specs.append(_bcast_spec(c.mask_bcast, block_t, block_s, q_axis, k_axis, head_block))
  if qseg is not None:
    arrays += [qseg, kseg]
    specs += [qseg_spec, kseg_spec]
  return arrays, specs


def _forward(q, k, v, bias, mask, qseg, kseg, c: _Static):
  """q ``[B, Tp, N, Dp]``, k/v ``[B, Sp, K, Dp]`` -> out ``[B, Tp, N, Dp]``, lse ``[B, N, Tp]``."""
  b, tp, n, d = q.shape
  sp = k.shape[1]
  bq = c.blocks.block_q
  g = c.groups
  grid = (tp // bq, b, n)
  extra, extra_specs = _extra_inputs(
      bias, mask, qseg, kseg, c, block_t=bq, block_s=sp, q_axis=0, k_axis=None,
      head_block=None,
      qseg_spec=pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
      kseg_spec=pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)))
  kernel = functools.partial(_fwd_kernel, c=c, has_seg=qseg is not None,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
          pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
          pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
      ] + extra_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
      ],
      out_shape=[pc.out_struct(q.shape, q.dtype, q, k, v),
                 pc.out_struct((b, n, tp), jnp.float32, q, k, v)],
      compiler_params=_params(c, d),
      interpret=c.interpret,
      name="flash_attention_fwd",
  )(q, k, v, *extra)


# --- Backward ---------------------------------------------------------------------------------

def _ds_tile(q, k, v, do, lse, delta, bias, mask, q_seg, k_seg, q_pos, k_pos, c, precision):
  """Recomputes one tile: p ``[bq, bk]`` and ds = d loss / d logits (before the scale)."""
  s, capped = _logits_tile(q, k, bias, mask, q_seg, k_seg, q_pos, k_pos, c, precision)
  # lse is +inf on rows with nothing visible: p is exactly 0 there, so are their gradients.
  p = jnp.exp(s - lse[:, None])
  dp = _dot(do, v, precision, tb=True)
  ds = p * (dp - delta[:, None])
  cap_grad = common.soft_cap_grad(capped, c.soft_cap)
  if cap_grad is not None:
    ds = ds * cap_grad
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: _Static,
               has_seg: bool, precision, write_ds: bool):
  bias_ref, mask_ref, qseg_ref, kseg_ref, out_refs = _split_refs(refs, c, has_seg)
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  nk = k_ref.shape[0] // bk
  q_start = pl.program_id(0) * bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = q_start + jnp.arange(bq)
  q_seg = None if qseg_ref is None else qseg_ref[...]
  lo, hi = common.kv_block_range(q_start, q_start + bq, c.window, bk, nk)

  def tile(j):
    k_start = pl.multiple_of(j * bk, bk)
    k_sl = pl.ds(k_start, bk)
    k = k_ref[k_sl, :]
    _, ds = _ds_tile(
        q, k, v_ref[k_sl, :], do, lse, delta,
        None if bias_ref is None else _load_tile(bias_ref, c.bias_bcast, None, slice(None), k_sl),
        None if mask_ref is None else _load_tile(mask_ref, c.mask_bcast, None, slice(None), k_sl),
        q_seg, None if kseg_ref is None else kseg_ref[k_sl], q_pos, k_start + jnp.arange(bk),
        c, precision)
    return k_sl, k, ds

  if write_ds:  # The dbias kernel: ds of every tile, zeros where the loop skips.
    (ds_ref,) = out_refs
    zeros = jnp.zeros((bq, bk), ds_ref.dtype)

    def write_zeros(j, carry):
      ds_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = zeros
      return carry

    def write_ds_body(j, carry):
      k_sl, _, ds = tile(j)
      ds_ref[:, k_sl] = ds.astype(ds_ref.dtype)
      return carry

    lax.fori_loop(0, jnp.minimum(lo, nk), write_zeros, 0)
    lax.fori_loop(lo, hi, write_ds_body, 0)
    lax.fori_loop(jnp.maximum(hi, lo), nk, write_zeros, 0)
    return

  (dq_ref,) = out_refs

  def body(j, dq):
    _, k, ds = tile(j)
    return dq + _dot(ds.astype(k.dtype), k, precision)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: _Static,
                 has_seg: bool, precision):
  bias_ref, mask_ref, qseg_ref, kseg_ref, (dk_ref, dv_ref) = _split_refs(refs, c, has_seg)
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  nq = q_ref.shape[0] // bq
  k_start = pl.program_id(0) * bk
  k, v = k_ref[...], v_ref[...]
  k_pos = k_start + jnp.arange(bk)
  k_seg = None if kseg_ref is None else kseg_ref[...]
  lo, hi = common.q_block_range(k_start, k_start + bk, c.window, bq, nq)

  # One flat loop over (query head of the group, visible query block): a nested fori_loop
  # here trips the interpret-mode discharge under shard_map (jax 0.10).
  num_blocks = jnp.maximum(hi - lo, 0)

  def body(step, carry):
    dk, dv = carry
    h = lax.div(step, num_blocks)
    i = lo + lax.rem(step, num_blocks)
    q_start = pl.multiple_of(i * bq, bq)
    q_sl = pl.ds(q_start, bq)
    q, do = q_ref[q_sl, h, :], do_ref[q_sl, h, :]
    p, ds = _ds_tile(
        q, k, v, do, lse_ref[h, q_sl], delta_ref[h, q_sl],
        None if bias_ref is None else _load_tile(bias_ref, c.bias_bcast, h, q_sl, slice(None)),
        None if mask_ref is None else _load_tile(mask_ref, c.mask_bcast, h, q_sl, slice(None)),
        None if qseg_ref is None else qseg_ref[q_sl], k_seg, q_start + jnp.arange(bq),
        k_pos, c, precision)
    dv = dv + _dot(p.astype(do.dtype), do, precision, ta=True)
    dk = dk + _dot(ds.astype(q.dtype), q, precision, ta=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, c.groups * num_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, bias, mask, qseg, kseg, out, lse, do, c: _Static):
  b, tp, n, d = q.shape
  sp, kh = k.shape[1], k.shape[2]
  g = c.groups
  precision = _precision(q.dtype)
  has_seg = qseg is not None
  # delta_i = sum_d o_id do_id = sum_j p_ij dp_ij (the softmax backward's row term); cheap and
  # memory-bound, so plain XLA.
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  common_in = (q, k, v, do, lse, delta)

  # dq (and ds for dbias): grid over query blocks.
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  dq_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
      pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
      pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
  ]
  extra, extra_specs = _extra_inputs(
      bias, mask, qseg, kseg, c, block_t=bq, block_s=sp, q_axis=0, k_axis=None,
      head_block=None,
      qseg_spec=pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
      kseg_spec=pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)))
  dq_call = functools.partial(
      pl.pallas_call, grid=(tp // bq, b, n), in_specs=dq_specs + extra_specs,
      compiler_params=_params(c, d), interpret=c.interpret)
  dq = dq_call(
      functools.partial(_dq_kernel, c=c, has_seg=has_seg, precision=precision,
                        write_ds=False),
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
      out_shape=pc.out_struct(q.shape, q.dtype, *common_in),
      name="flash_attention_dq",
  )(*common_in, *extra)

  dbias = None
  if bias is not None:
    # ds for every (query, key) pair, then summed over the bias's broadcast axes. O(T * S)
    # memory, like the bias itself; XLA drops it when the bias needs no gradient.
    ds = dq_call(
        functools.partial(_dq_kernel, c=c, has_seg=has_seg, precision=precision,
                          write_ds=True),
        out_specs=pl.BlockSpec((None, None, bq, sp), lambda i, bi, h: (bi, h, i, 0)),
        out_shape=pc.out_struct((b, n, tp, sp), jnp.float32, *common_in),
        name="flash_attention_dbias",
    )(*common_in, *extra)
    dbias = common.reduce_to_shape(ds, bias.shape).astype(bias.dtype)

  # dk, dv: grid over key blocks and kv heads; the group's query heads are a loop inside.
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  dkv_specs = [
      pl.BlockSpec((None, tp, g, d), lambda j, bi, h: (bi, 0, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
      pl.BlockSpec((None, tp, g, d), lambda j, bi, h: (bi, 0, h, 0)),
      pl.BlockSpec((None, g, tp), lambda j, bi, h: (bi, h, 0)),
      pl.BlockSpec((None, g, tp), lambda j, bi, h: (bi, h, 0)),
  ]
  extra, extra_specs = _extra_inputs(
      bias, mask, qseg, kseg, c, block_t=tp, block_s=bk, q_axis=None, k_axis=0,
      head_block=g,
      qseg_spec=pl.BlockSpec((None, tp), lambda j, bi, h: (bi, 0)),
      kseg_spec=pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, c=c, has_seg=has_seg, precision=precision),
      grid=(sp // bk, b, kh),
      in_specs=dkv_specs + extra_specs,
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
                 pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0))],
      out_shape=[pc.out_struct(k.shape, k.dtype, *common_in),
                 pc.out_struct(v.shape, v.dtype, *common_in)],
      compiler_params=_params(c, d),
      interpret=c.interpret,
      name="flash_attention_dkdv",
  )(*common_in, *extra)
  return dq, dk, dv, dbias


_flash = common.flash_with_vjp(_forward, _backward)


def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False,
              block_sizes: BlockSizes | None = None):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  bias/mask ``[B|1, N|1, T|1, S|1]``, segment ids ``[B, T]`` / ``[B, S]`` int32.
  ``block_sizes``: tiles for tuning (default: ``BlockSizes.default`` from shape and dtype).
  """
  b, t, n, d = query.shape
  s_len, kh = key.shape[1], key.shape[2]
  bs = block_sizes or BlockSizes.default(t, s_len, d, query.dtype)
  bs = bs.fit(t, s_len)
  bs.validate()
  dp = max(_MIN_BLOCK, common.next_power_of_2(d))
  tp = common.round_up(t, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  sp = common.round_up(s_len, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  q = common.pad_axis(common.pad_axis(query, 3, dp), 1, tp)
  k = common.pad_axis(common.pad_axis(key, 3, dp), 1, sp)
  v = common.pad_axis(common.pad_axis(value, 3, dp), 1, sp)
  if bias is not None:
    bias = common.pad_axis(common.pad_axis(bias, 2, tp, broadcast=True), 3, sp, broadcast=True)
  if mask is not None:
    # Triton loads bytes, not i1.
    mask = common.pad_axis(common.pad_axis(mask.astype(jnp.int8), 2, tp, broadcast=True), 3, sp,
                   broadcast=True)
  qseg = common.pad_axis(query_segment_ids, 1, tp)
  kseg = common.pad_axis(kv_segment_ids, 1, sp)

  def bcast(x):
    return None if x is None else tuple(a > 1 for a in x.shape)

  c = _Static(scale=float(scale), window=window, soft_cap=soft_cap, q_len=t, kv_len=s_len,
              kv_padded=sp != s_len, head_dim=d, groups=n // kh, blocks=bs, bias_bcast=bcast(bias),
              mask_bcast=bcast(mask), interpret=bool(interpret))
  out = _flash(c, q, k, v, bias, mask, qseg, kseg)
  return out[:, :t, :, :d]


def unsupported_reason(args) -> str | None:
  """Why this kernel cannot serve ``args`` (an ``AttentionArgs``), or None."""
  if args.dtype not in SUPPORTED_DTYPES:
    return f"dtype {args.dtype} is not one of {', '.join(SUPPORTED_DTYPES)}"
  if args.head_dim > MAX_HEAD_DIM:
    return f"head_dim {args.head_dim} > {MAX_HEAD_DIM}"
  return None

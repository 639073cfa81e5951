"""Forward kernel of ``implementation="mosaic_gpu"`` and the pieces the backward kernels share
(the design is described in ``mosaic_gpu.py``).

The ``plgpu`` module is imported on first use: on JAX < 0.11 this file must import cleanly so
that ``mosaic_gpu.unsupported_reason`` can say why the backend is unavailable.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import common
from .. import mosaic_gpu_common as mgc


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""
  scale: float
  window: common.Window
  soft_cap: float | None
  kv_len: int
  kv_padded: bool   # keys beyond kv_len exist (ragged S): hide them by position
  groups: int       # query heads per kv head
  blocks: object    # a mosaic_gpu.BlockSizes (defined there, with the tuning code)
  interpret: bool


# --- Pieces shared with the backward kernels --------------------------------------------------

def plgpu_mod():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


def tile_transforms():
  """SMEM tiling + 128-byte swizzle of a 16-bit ``[rows, cols]`` wgmma operand."""
  plgpu = plgpu_mod()
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def smem_tile(shape, dtype):
  return plgpu_mod().SMEM(shape, dtype, transforms=tile_transforms())


def matmul(a_smem, b_smem, shape):
  """``a @ b`` of two SMEM operands into a fresh wgmma accumulator -> float32 WGMMA registers."""
  plgpu = plgpu_mod()
  from jax.experimental import pallas as pl

  def body(acc):
    plgpu.wgmma(acc, a_smem, b_smem)
    return acc[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def iota(shape, dim):
  plgpu = plgpu_mod()
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def vector(ref, axis):
  """A ``[n]`` SMEM vector in the layout of axis ``axis`` of a WGMMA tile (rows: 1, cols: 0)."""
  plgpu = plgpu_mod()
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(axis))


def bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def visible(shape, row_pos, col_pos, rows_are_queries: bool, c: Static, row_seg=None,
            col_seg=None):
  """Boolean tile of visible (query, key) pairs, or None; rows/cols are queries or keys."""
  rows = iota(shape, 0) + row_pos
  cols = iota(shape, 1) + col_pos
  q, k = (rows, cols) if rows_are_queries else (cols, rows)
  w = c.window
  mask = None
  if w.right is not None:
    mask = common.and_masks(mask, k <= q + w.right)
  if w.left is not None:
    mask = common.and_masks(mask, k >= q - w.left)
  if c.kv_padded:
    mask = common.and_masks(mask, k < c.kv_len)
  if row_seg is not None:
    mask = common.and_masks(mask, bcast(row_seg, shape, 0) == bcast(col_seg, shape, 1))
  return mask


def logits(s, c: Static):
  """Raw ``q k^T`` -> scaled and soft-capped logits, and the cap's derivative (or None)."""
  s = s * c.scale
  if c.soft_cap is None:
    return s, None
  t = jnp.tanh(s * (1.0 / c.soft_cap))
  return c.soft_cap * t, 1.0 - t * t


def ring(load, lo, hi, stages: int, body, carry):
  """``fori_loop(lo, hi, body)`` over blocks whose inputs ``load(block, slot)`` starts by TMA
  ``stages - 1`` steps ahead; ``body(block, slot, carry)`` waits for its slot itself. The slot a
  prefetch overwrites was read by the previous step, whose wgmmas have completed."""
  from jax.experimental import pallas as pl
  for i in range(stages - 1):
    pl.when(lo + i < hi)(functools.partial(load, lo + i, i))

  def step(j, carry):
    r = j - lo
    nxt = j + stages - 1
    pl.when(nxt < hi)(functools.partial(load, nxt, lax.rem(r + stages - 1, stages)))
    return body(j, lax.rem(r, stages), carry)

  return lax.fori_loop(lo, hi, step, carry)


# --- Forward -----------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, scratch, c: Static):
  from jax.experimental import pallas as pl
  plgpu = plgpu_mod()
  q_smem, k_smem, v_smem, p_smem, lse_smem = (scratch[x] for x in ("q", "k", "v", "p", "lse"))
  qseg_smem, kseg_smem = scratch["qseg"], scratch["kseg"]
  q_bar, kv_bar = scratch["q_bar"], scratch["kv_bar"]
  bq, bk, stages = c.blocks.block_q, c.blocks.block_k, c.blocks.num_stages
  d = q_ref.shape[-1]
  qi, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
  kh = lax.div(h, c.groups)
  q_start = qi * bq
  rows = pl.ds(q_start, bq)
  nk = k_ref.shape[1] // bk
  lo, hi = common.kv_block_range(q_start, q_start + bq, c.window, bk, nk)
  has_seg = qseg_ref is not None

  plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bar.at[0])
  if has_seg:
    plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem, q_bar.at[1])
    plgpu.barrier_wait(q_bar.at[1])
  plgpu.barrier_wait(q_bar.at[0])
  q_seg = vector(qseg_smem, 1) if has_seg else None

  def load(j, slot):
    cols = pl.ds(j * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], k_smem.at[slot], kv_bar.at[0, slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], v_smem.at[slot], kv_bar.at[1, slot])
    if has_seg:
      plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_smem.at[slot], kv_bar.at[2, slot])

  def body(j, slot, carry):
    o, m, l = carry
    plgpu.barrier_wait(kv_bar.at[0, slot])
    s = matmul(q_smem, k_smem.at[slot].T, (bq, bk))
    s, _ = logits(s, c)
    k_seg = None
    if has_seg:
      plgpu.barrier_wait(kv_bar.at[2, slot])
      k_seg = vector(kseg_smem.at[slot], 0)
    mask = visible((bq, bk), q_start, j * bk, True, c, q_seg, k_seg)
    s = common.apply_mask(s, mask)
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = common.safe_max(m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - bcast(m_safe, s.shape, 0))
    l = l * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()  # make the p tile visible to the tensor cores
    plgpu.barrier_wait(kv_bar.at[1, slot])
    o = o * bcast(alpha, o.shape, 0) + matmul(p_smem, v_smem.at[slot], o.shape)
    return o, m_new, l

  layout = plgpu.Layout.WGMMA.reduce(1)
  init = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((bq,), common.MASKED, jnp.float32), layout),
          plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), layout))
  o, m, l = ring(load, lo, hi, stages, body, init)
  o = o * bcast(common.safe_reciprocal(l), o.shape, 0)
  q_smem[...] = o.astype(q_smem.dtype)  # the query tile is free now: stage the output there
  lse_smem[...] = common.finalize_lse(m, l)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
  plgpu.wait_smem_to_gmem(0)


def named_scratch(scratch: dict):
  """``plgpu.kernel`` scratch from ``{name: type or None}``: the types, and a function mapping the
  kernel's scratch refs back to ``{name: ref or None}``."""
  names = [k for k, t in scratch.items() if t is not None]

  def unpack(refs):
    got = dict(zip(names, refs))
    return {k: got.get(k) for k in scratch}

  return [scratch[k] for k in names], unpack


def forward(q, k, v, qseg, kseg, c: Static):
  """q ``[B, Tp, N, D]``, k/v ``[B, Sp, K, D]`` -> out ``[B, Tp, N, D]``, lse ``[B, N, Tp]``."""
  plgpu = plgpu_mod()
  b, tp, n, d = q.shape
  bq, bk, stages = c.blocks.block_q, c.blocks.block_k, c.blocks.num_stages
  has_seg = qseg is not None
  types, unpack = named_scratch({
      "q": smem_tile((bq, d), q.dtype),
      "k": smem_tile((stages, bk, d), k.dtype),
      "v": smem_tile((stages, bk, d), v.dtype),
      "p": smem_tile((bq, bk), q.dtype),
      "lse": plgpu.SMEM((bq,), jnp.float32),
      "qseg": plgpu.SMEM((bq,), jnp.int32) if has_seg else None,
      "kseg": plgpu.SMEM((stages, bk), jnp.int32) if has_seg else None,
      "q_bar": plgpu.Barrier(num_barriers=2),
      "kv_bar": plgpu.Barrier(num_barriers=3 * stages),
  })

  def kernel(q_ref, k_ref, v_ref, *refs):
    n_in = 2 if has_seg else 0
    seg = refs[:n_in] if has_seg else (None, None)
    o_ref, lse_ref = refs[n_in:n_in + 2]
    sc = unpack(refs[n_in + 2:])
    sc["kv_bar"] = Barriers2D(sc["kv_bar"], stages)
    _fwd_kernel(q_ref, k_ref, v_ref, *seg, o_ref, lse_ref, sc, c)

  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      grid=(tp // bq, n, b), grid_names=("q", "heads", "batch"),
      scratch_types=types, **mgc.kernel_kwargs(c.interpret),
  )(q, k, v, *((qseg, kseg) if has_seg else ()))


class Barriers2D:
  """``bar.at[kind, slot]`` over a flat barrier array of ``kinds * stages`` barriers."""

  def __init__(self, ref, stages: int):
    self.ref, self.stages = ref, stages

  @property
  def at(self):
    return self

  def __getitem__(self, idx):
    kind, slot = idx
    return self.ref.at[kind * self.stages + slot]

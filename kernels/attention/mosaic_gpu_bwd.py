"""Backward kernels of ``implementation="mosaic_gpu"`` (the design is in ``mosaic_gpu.py``;
the shared tile helpers are in ``mosaic_gpu_fwd.py``).

Both recompute ``p = exp(logits - lse)`` tile by tile from the forward's log-sum-exp, with
``ds = p * (dp - delta)`` (times the soft cap's derivative) and ``delta_i = sum_d o_id do_id``:
  * dq, grid ``(T / block_q_dq, heads, batch)``: the query and output-gradient blocks stay in
    SMEM while a TMA ring streams the visible key/value blocks; ``s = q k^T`` and
    ``dp = do v^T`` are wgmmas; ``ds`` goes to SMEM for ``dq += ds k``.
  * dk/dv, grid ``(S / block_k_dkv, kv_heads, batch)``: the key and value blocks stay in SMEM;
    one flat loop walks (query head of the group, visible query block) with a TMA ring of
    query, output-gradient, lse and delta blocks. It works on transposed tiles (keys are rows):
    ``s^T = k q^T``, ``dp^T = v do^T``; ``p^T`` and ``ds^T`` go to SMEM for ``dv += p^T do``
    and ``dk += ds^T q``. GQA needs no extra reduction: the group's heads meet in the loop.
Every matmul is an SMEM x SMEM wgmma with a 64-row tile, for the reasons in ``mosaic_gpu.py``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import common
from . import mosaic_gpu_fwd as fwd
from .. import mosaic_gpu_common as mgc


def _ds_tile(s, p_lse, dp, delta, cap_grad, mask, axis: int):
  """ds from raw logits tile and lse/delta along ``axis`` (1: rows are queries, 0: columns)."""
  s = common.apply_mask(s, mask)
  p = jnp.exp(s - fwd.bcast(p_lse, s.shape, 1 - axis))
  ds = p * (dp - fwd.bcast(delta, s.shape, 1 - axis))
  if cap_grad is not None:
    ds = ds * cap_grad
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, sc,
               c: fwd.Static):
  from jax.experimental import pallas as pl
  plgpu = fwd.plgpu_mod()
  bq, bk, stages = c.blocks.block_q_dq, c.blocks.block_k_dq, c.blocks.num_stages
  d = q_ref.shape[-1]
  qi, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
  kh = lax.div(h, c.groups)
  q_start = qi * bq
  rows = pl.ds(q_start, bq)
  nk = k_ref.shape[1] // bk
  lo, hi = common.kv_block_range(q_start, q_start + bq, c.window, bk, nk)
  has_seg = qseg_ref is not None
  q_bar, kv_bar = sc["q_bar"], sc["kv_bar"]

  plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], sc["q"], q_bar.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], sc["do"], q_bar.at[1])
  plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], sc["lse"], q_bar.at[2])
  plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], sc["delta"], q_bar.at[3])
  if has_seg:
    plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], sc["qseg"], q_bar.at[4])
  for i in range(5 if has_seg else 4):
    plgpu.barrier_wait(q_bar.at[i])
  lse, delta = fwd.vector(sc["lse"], 1), fwd.vector(sc["delta"], 1)
  q_seg = fwd.vector(sc["qseg"], 1) if has_seg else None

  def load(j, slot):
    cols = pl.ds(j * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], sc["k"].at[slot], kv_bar.at[0, slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], sc["v"].at[slot], kv_bar.at[1, slot])
    if has_seg:
      plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], sc["kseg"].at[slot], kv_bar.at[2, slot])

  def body(j, slot, dq):
    k_smem, v_smem = sc["k"].at[slot], sc["v"].at[slot]
    plgpu.barrier_wait(kv_bar.at[0, slot])
    s, cap_grad = fwd.logits(fwd.matmul(sc["q"], k_smem.T, (bq, bk)), c)
    k_seg = None
    if has_seg:
      plgpu.barrier_wait(kv_bar.at[2, slot])
      k_seg = fwd.vector(sc["kseg"].at[slot], 0)
    mask = fwd.visible((bq, bk), q_start, j * bk, True, c, q_seg, k_seg)
    plgpu.barrier_wait(kv_bar.at[1, slot])
    dp = fwd.matmul(sc["do"], v_smem.T, (bq, bk))
    _, ds = _ds_tile(s, lse, dp, delta, cap_grad, mask, 1)
    sc["ds"][...] = ds.astype(sc["ds"].dtype)
    plgpu.commit_smem()  # make the ds tile visible to the tensor cores
    return dq + fwd.matmul(sc["ds"], k_smem, (bq, d))

  dq0 = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)
  dq = fwd.ring(load, lo, hi, stages, body, dq0)
  sc["q"][...] = (dq * c.scale).astype(sc["q"].dtype)  # stage dq in the query tile
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(sc["q"], dq_ref.at[b, rows, h])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref,
                 dv_ref, sc, c: fwd.Static):
  from jax.experimental import pallas as pl
  plgpu = fwd.plgpu_mod()
  bq, bk, stages = c.blocks.block_q_dkv, c.blocks.block_k_dkv, c.blocks.num_stages
  d = k_ref.shape[-1]
  ki, kh, b = lax.axis_index("k"), lax.axis_index("heads"), lax.axis_index("batch")
  k_start = ki * bk
  cols = pl.ds(k_start, bk)
  nq = q_ref.shape[1] // bq
  lo, hi = common.q_block_range(k_start, k_start + bk, c.window, bq, nq)
  # One flat loop over (query head of the group, visible query block), so that the TMA ring
  # runs across head boundaries.
  num_blocks = jnp.maximum(hi - lo, 0)
  has_seg = qseg_ref is not None
  k_bar, q_bar = sc["k_bar"], sc["q_bar"]

  plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], sc["k"], k_bar.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], sc["v"], k_bar.at[1])
  if has_seg:
    plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], sc["kseg"], k_bar.at[2])
  for i in range(3 if has_seg else 2):
    plgpu.barrier_wait(k_bar.at[i])
  k_seg = fwd.vector(sc["kseg"], 1) if has_seg else None

  def head_block(step):
    return kh * c.groups + lax.div(step, num_blocks), lo + lax.rem(step, num_blocks)

  def load(step, slot):
    h, i = head_block(step)
    rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], sc["q"].at[slot], q_bar.at[0, slot])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], sc["do"].at[slot], q_bar.at[1, slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], sc["lse"].at[slot], q_bar.at[2, slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], sc["delta"].at[slot], q_bar.at[3, slot])
    if has_seg:
      plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], sc["qseg"].at[slot], q_bar.at[4, slot])

  def body(step, slot, carry):
    dk, dv = carry
    _, i = head_block(step)
    q_smem, do_smem = sc["q"].at[slot], sc["do"].at[slot]
    for kind in range(5 if has_seg else 4):
      plgpu.barrier_wait(q_bar.at[kind, slot])
    s, cap_grad = fwd.logits(fwd.matmul(sc["k"], q_smem.T, (bk, bq)), c)
    q_seg = fwd.vector(sc["qseg"].at[slot], 0) if has_seg else None
    mask = fwd.visible((bk, bq), k_start, i * bq, False, c, k_seg, q_seg)
    dp = fwd.matmul(sc["v"], do_smem.T, (bk, bq))
    p, ds = _ds_tile(s, fwd.vector(sc["lse"].at[slot], 0), dp,
                     fwd.vector(sc["delta"].at[slot], 0), cap_grad, mask, 0)
    sc["p"][...] = p.astype(sc["p"].dtype)
    sc["ds"][...] = ds.astype(sc["ds"].dtype)
    plgpu.commit_smem()  # make the p^T and ds^T tiles visible to the tensor cores
    dv = dv + fwd.matmul(sc["p"], do_smem, (bk, d))
    dk = dk + fwd.matmul(sc["ds"], q_smem, (bk, d))
    return dk, dv

  zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
  dk, dv = fwd.ring(load, 0, c.groups * num_blocks, stages, body, (zeros, zeros))
  # The key and value tiles are free now: stage the gradients there.
  sc["k"][...] = (dk * c.scale).astype(sc["k"].dtype)
  sc["v"][...] = dv.astype(sc["v"].dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(sc["k"], dk_ref.at[b, cols, kh])
  plgpu.copy_smem_to_gmem(sc["v"], dv_ref.at[b, cols, kh])
  plgpu.wait_smem_to_gmem(0)


def _split(refs, n_in: int, has_seg: bool, n_out: int):
  """Kernel refs -> (inputs with seg ids or None, outputs, scratch)."""
  ins = list(refs[:n_in])
  seg = ins[-2:] if has_seg else [None, None]
  ins = ins[:-2] if has_seg else ins
  return ins + seg, refs[n_in:n_in + n_out], refs[n_in + n_out:]


def backward(q, k, v, qseg, kseg, out, lse, do, c: fwd.Static):
  """Gradients (dq, dk, dv) of the padded forward ``_forward(q, k, v, ...)``."""
  plgpu = fwd.plgpu_mod()
  b, tp, n, d = q.shape
  sp, kh = k.shape[1], k.shape[2]
  stages = c.blocks.num_stages
  has_seg = qseg is not None
  # delta_i = sum_d o_id do_id: one memory-bound pass, cheaper in XLA than in either kernel.
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  ins = (q, k, v, do, lse, delta) + ((qseg, kseg) if has_seg else ())
  seg32 = jnp.int32

  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  types, unpack = fwd.named_scratch({
      "q": fwd.smem_tile((bq, d), q.dtype), "do": fwd.smem_tile((bq, d), q.dtype),
      "lse": plgpu.SMEM((bq,), jnp.float32), "delta": plgpu.SMEM((bq,), jnp.float32),
      "qseg": plgpu.SMEM((bq,), seg32) if has_seg else None,
      "k": fwd.smem_tile((stages, bk, d), k.dtype), "v": fwd.smem_tile((stages, bk, d), v.dtype),
      "kseg": plgpu.SMEM((stages, bk), seg32) if has_seg else None,
      "ds": fwd.smem_tile((bq, bk), q.dtype),
      "q_bar": plgpu.Barrier(num_barriers=5), "kv_bar": plgpu.Barrier(num_barriers=3 * stages),
  })

  def dq_kernel(*refs):
    args, (dq_ref,), scratch = _split(refs, len(ins), has_seg, 1)
    sc = unpack(scratch)
    sc["kv_bar"] = fwd.Barriers2D(sc["kv_bar"], stages)
    _dq_kernel(*args, dq_ref, sc, c)

  dq = plgpu.kernel(
      dq_kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(tp // bq, n, b),
      grid_names=("q", "heads", "batch"), scratch_types=types,
      **mgc.kernel_kwargs(c.interpret))(*ins)

  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  types, unpack = fwd.named_scratch({
      "k": fwd.smem_tile((bk, d), k.dtype), "v": fwd.smem_tile((bk, d), v.dtype),
      "kseg": plgpu.SMEM((bk,), seg32) if has_seg else None,
      "q": fwd.smem_tile((stages, bq, d), q.dtype), "do": fwd.smem_tile((stages, bq, d), q.dtype),
      "lse": plgpu.SMEM((stages, bq), jnp.float32),
      "delta": plgpu.SMEM((stages, bq), jnp.float32),
      "qseg": plgpu.SMEM((stages, bq), seg32) if has_seg else None,
      "p": fwd.smem_tile((bk, bq), q.dtype), "ds": fwd.smem_tile((bk, bq), q.dtype),
      "k_bar": plgpu.Barrier(num_barriers=3), "q_bar": plgpu.Barrier(num_barriers=5 * stages),
  })

  def dkdv_kernel(*refs):
    args, (dk_ref, dv_ref), scratch = _split(refs, len(ins), has_seg, 2)
    sc = unpack(scratch)
    sc["q_bar"] = fwd.Barriers2D(sc["q_bar"], stages)
    _dkdv_kernel(*args, dk_ref, dv_ref, sc, c)

  dk, dv = plgpu.kernel(
      dkdv_kernel,
      out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(sp // bk, kh, b), grid_names=("k", "heads", "batch"), scratch_types=types,
      **mgc.kernel_kwargs(c.interpret))(*ins)
  return dq, dk, dv

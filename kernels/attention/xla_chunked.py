"""``implementation="xla_chunked"``: flash attention written in plain JAX.

Online softmax over key blocks inside a loop over query blocks, forward and backward, so the
largest temporary is one ``[batch, heads, block_q, block_k]`` tile: O(T) memory on any backend
(the CPU default for long sequences). Causal and sliding-window blocks that are fully hidden are
skipped through the loop bounds, not computed and discarded.

Forward: for each query block, ``lax.fori_loop`` over the visible key blocks keeping the running
max ``m``, sum ``l`` and unnormalized output in float32; saves the output and the log-sum-exp
``lse = m + log l`` per row.
Backward (one pass, ``jax.custom_vjp``): for each key block, loop over the query blocks that can
see it, recompute ``p = exp(s - lse)``, accumulate dk and dv for the block and add the block's
share of dq into a full-length float32 dq buffer (in-place dynamic-update-slice).

Layout inside: the caller's ``[B, T, N, D]`` viewed as ``[B, T, K, G, D]`` (N = K * G query
heads share kv head K), tiles of logits ``[B, K, G, bq, bk]``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from . import common
from .reference import grouped_bias


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key block lengths of the loops. Larger blocks: fewer, larger matmuls (faster on
  CPU) but larger temporaries (``batch * heads * block_q * block_k`` float32 each)."""
  block_q: int = 512
  block_k: int = 512

  @classmethod
  def default(cls, q_len: int, kv_len: int) -> "BlockSizes":
    return cls(block_q=_fit(512, q_len), block_k=_fit(512, kv_len))


def _fit(block: int, length: int) -> int:
  # A sequence shorter than the block is one block of its own length (no padding).
  return length if length <= block else block


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable static configuration (a nondiff argument of the custom_vjp)."""
  scale: float
  window: common.Window
  soft_cap: float | None
  q_len: int      # true T (the arrays are padded to a multiple of block_q)
  kv_len: int     # true S
  block_q: int
  block_k: int
  bias_shape: tuple | None   # grouped [B|1, K|1, G|1, Tp|1, Sp|1]
  mask_shape: tuple | None


def _tile(x, q_start, k_start, bq: int, bk: int):
  """The ``[.., bq|1, bk|1]`` tile of a broadcastable ``[.., Tp|1, Sp|1]`` bias or mask."""
  if x is None:
    return None
  t, s = x.shape[-2:]
  starts = (0,) * (x.ndim - 2) + (q_start if t > 1 else 0, k_start if s > 1 else 0)
  sizes = x.shape[:-2] + (bq if t > 1 else 1, bk if s > 1 else 1)
  return lax.dynamic_slice(x, starts, sizes)


def _logits(qb, kb, bias_t, mask_t, qseg_b, kseg_b, q_start, k_start, c: _Static):
  """Masked logits of one tile and the capped logits before masking (for the cap's gradient).

  qb ``[B, bq, K, G, D]``, kb ``[B, bk, K, D]`` -> ``[B, K, G, bq, bk]`` float32.
  """
  bq, bk = qb.shape[1], kb.shape[1]
  s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
  s = common.transform_logits(s, scale=c.scale, bias=bias_t, soft_cap=c.soft_cap)
  padded = c.kv_len % c.block_k != 0
  visible = common.and_masks(
      common.position_mask(q_start + jnp.arange(bq), k_start + jnp.arange(bk), c.window,
                           c.kv_len if padded else None),
      mask_t,
      None if qseg_b is None else common.segment_mask(qseg_b, kseg_b)[:, None, None])
  return common.apply_mask(s, visible), s


def _slice_seq(x, start, size, axis=1):
  return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(q, k, v, bias, mask, qseg, kseg, c: _Static):
  """q ``[B, Tp, K, G, D]``, k/v ``[B, Sp, K, D]`` -> out (q's shape and dtype), lse
  ``[B, K, G, Tp]`` float32."""
  b, tp, kh, g, d = q.shape
  sp = k.shape[1]
  bq, bk = c.block_q, c.block_k
  nq, nk = tp // bq, sp // bk

  def q_block(i, carry):
    out, lse = carry
    q_start = i * bq
    qb = _slice_seq(q, q_start, bq)
    qseg_b = _slice_seq(qseg, q_start, bq)
    lo, hi = common.kv_block_range(q_start, q_start + bq, c.window, bk, nk)

    def kv_step(j, state):
      acc, m, l = state
      k_start = j * bk
      s, _ = _logits(qb, _slice_seq(k, k_start, bk), _tile(bias, q_start, k_start, bq, bk),
                     _tile(mask, q_start, k_start, bq, bk), qseg_b,
                     _slice_seq(kseg, k_start, bk), q_start, k_start, c)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = common.safe_max(m_new)
      correction = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      l = l * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice_seq(v, k_start, bk),
                      preferred_element_type=jnp.float32)
      return acc * correction[..., None] + pv, m_new, l

    init = (common.full((b, kh, g, bq, d), 0.0, jnp.float32, qb),
            common.full((b, kh, g, bq), common.MASKED, jnp.float32, qb),
            common.full((b, kh, g, bq), 0.0, jnp.float32, qb))
    acc, m, l = lax.fori_loop(lo, hi, kv_step, init)
    ob = acc * common.safe_reciprocal(l)[..., None]
    ob = jnp.transpose(ob, (0, 3, 1, 2, 4)).astype(out.dtype)  # [B, bq, K, G, D]
    out = lax.dynamic_update_slice_in_dim(out, ob, q_start, 1)
    lse = lax.dynamic_update_slice_in_dim(lse, common.finalize_lse(m, l), q_start, 3)
    return out, lse

  init = (common.full(q.shape, 0, q.dtype, q), common.full((b, kh, g, tp), 0.0, jnp.float32, q))
  return lax.fori_loop(0, nq, q_block, init)


def _backward(q, k, v, bias, mask, qseg, kseg, out, lse, do, c: _Static):
  b, tp, kh, g, d = q.shape
  sp = k.shape[1]
  bq, bk = c.block_q, c.block_k
  nq, nk = tp // bq, sp // bk
  # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: the softmax backward's row term.
  delta = jnp.einsum("btkgd,btkgd->bkgt", out.astype(jnp.float32), do.astype(jnp.float32))

  def kv_block(j, carry):
    dq, dk, dv, dbias = carry
    k_start = j * bk
    kb, vb = _slice_seq(k, k_start, bk), _slice_seq(v, k_start, bk)
    kseg_b = _slice_seq(kseg, k_start, bk)
    lo, hi = common.q_block_range(k_start, k_start + bk, c.window, bq, nq)

    def q_step(i, state):
      dq, dk_b, dv_b, dbias = state
      q_start = i * bq
      qb, dob = _slice_seq(q, q_start, bq), _slice_seq(do, q_start, bq)
      s, capped = _logits(qb, kb, _tile(bias, q_start, k_start, bq, bk),
                          _tile(mask, q_start, k_start, bq, bk),
                          _slice_seq(qseg, q_start, bq), kseg_b, q_start, k_start, c)
      # lse is +inf on rows with nothing visible: p is exactly 0 there.
      p = jnp.exp(s - _slice_seq(lse, q_start, bq, axis=3)[..., None])
      dv_b = dv_b + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), dob,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - _slice_seq(delta, q_start, bq, axis=3)[..., None])
      cap_grad = common.soft_cap_grad(capped, c.soft_cap)
      if cap_grad is not None:
        ds = ds * cap_grad
      if dbias is not None:  # d loss / d bias is ds itself, summed over broadcast axes.
        tile = tuple(1 if n == 1 else m for n, m in zip(dbias.shape[-2:], ds.shape[-2:]))
        db = common.reduce_to_shape(ds, dbias.shape[:-2] + tile)
        starts = (0,) * (db.ndim - 2) + (q_start if dbias.shape[-2] > 1 else 0,
                                        k_start if dbias.shape[-1] > 1 else 0)
        dbias = lax.dynamic_update_slice(
            dbias, lax.dynamic_slice(dbias, starts, db.shape) + db, starts)
      ds = (ds * c.scale).astype(q.dtype)
      dq_b = jnp.einsum("bkgqs,bskd->bqkgd", ds, kb, preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(
          dq, _slice_seq(dq, q_start, bq) + dq_b, q_start, 1)
      dk_b = dk_b + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
      return dq, dk_b, dv_b, dbias

    zeros = common.full((b, bk, kh, d), 0.0, jnp.float32, kb)
    dq, dk_b, dv_b, dbias = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros, dbias))
    dk = lax.dynamic_update_slice_in_dim(dk, dk_b.astype(dk.dtype), k_start, 1)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_b.astype(dv.dtype), k_start, 1)
    return dq, dk, dv, dbias

  init = (common.full(q.shape, 0.0, jnp.float32, do), common.full(k.shape, 0, k.dtype, do),
          common.full(v.shape, 0, v.dtype, do),
          None if bias is None else common.full(bias.shape, 0.0, jnp.float32, do))
  dq, dk, dv, dbias = lax.fori_loop(0, nk, kv_block, init)
  return dq.astype(q.dtype), dk, dv, None if bias is None else dbias.astype(bias.dtype)


_flash = common.flash_with_vjp(_forward, _backward)




def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False,
              block_sizes: BlockSizes | None = None):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  bias/mask ``[B|1, N|1, T|1, S|1]``, segment ids ``[B, T]`` / ``[B, S]`` int32.
  """
  del interpret
  b, t, n, d = query.shape
  s_len, kh = key.shape[1], key.shape[2]
  g = n // kh
  bs = block_sizes or BlockSizes.default(t, s_len)
  bq, bk = _fit(bs.block_q, t), _fit(bs.block_k, s_len)
  tp, sp = common.round_up(t, bq), common.round_up(s_len, bk)
  # Ragged lengths: pad to whole blocks outside the custom_vjp (JAX differentiates the pad and
  # the final slice); padded keys are hidden by the kv_len mask, padded query rows dropped.
  q = common.pad_axis(query.reshape(b, t, kh, g, d), 1, tp)
  k, v = common.pad_axis(key, 1, sp), common.pad_axis(value, 1, sp)
  bias = grouped_bias(bias, kh)
  mask = grouped_bias(mask, kh)
  bias = common.pad_axis(common.pad_axis(bias, 3, tp, broadcast=True), 4, sp, broadcast=True)
  mask = common.pad_axis(common.pad_axis(mask, 3, tp, broadcast=True), 4, sp, broadcast=True)
  qseg = common.pad_axis(query_segment_ids, 1, tp)
  kseg = common.pad_axis(kv_segment_ids, 1, sp)
  c = _Static(scale=float(scale), window=window, soft_cap=soft_cap, q_len=t, kv_len=s_len,
              block_q=bq, block_k=bk,
              bias_shape=None if bias is None else bias.shape,
              mask_shape=None if mask is None else mask.shape)
  out = _flash(c, q, k, v, bias, mask, qseg, kseg)
  return out[:, :t].reshape(b, t, n, d)


def unsupported_reason(args) -> str | None:
  """Serves every argument combination."""
  del args
  return None

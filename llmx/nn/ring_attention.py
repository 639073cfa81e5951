"""Attention over a sequence split across devices (context parallelism), per shard.

Both functions run inside `jax.shard_map` over the context axis: each device holds the queries,
keys and values of its share of every row, in the zig-zag layout of llmx/nn/context.py (with C
shards the row is cut into 2C chunks and shard c holds chunks c and 2C-1-c, so that under a
causal mask every shard has the same amount of visible work). Causal masks come from the tokens'
indices in the whole row, which the layout fixes, so they need no input.

* `ring_attention`: the keys and values (with their segment ids) travel around the ring with
  `lax.ppermute`, one neighbour hop per step, while each shard keeps its queries and merges the
  partial results by their log-sum-exp. Forward and backward are a `jax.custom_vjp`; the
  backward is a second ring pass carrying the keys, values and their gradient accumulators,
  recomputing the probabilities from the saved log-sum-exp, so memory stays O(local sequence).
  Under a causal mask, blocks that the zig-zag layout makes half invisible are computed at half
  size (`lax.switch` on the block's source shard). Within a step the queries go in blocks of
  `query_block`, so no step holds more than [B, N, query_block, T] logits.
* `all_gather_attention`: gathers every key and value, then one local attention (the kernel op)
  with a mask from the indices. O(global sequence) keys per device; its backward is autodiff's
  (a reduce-scatter of the key/value gradients).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import llmx_kernels as kernels

# Queries per inner block of a ring step (the logits of a step are [B, N, QUERY_BLOCK, S / C]).
QUERY_BLOCK = 512


def zigzag_index(shard, num_shards: int, local_len: int):
  """The indices in the whole row of shard `shard`'s tokens (int [local_len]): chunks `shard`
  and 2 * num_shards - 1 - shard of length local_len / 2. shard: a Python int or a traced one."""
  half = local_len // 2
  r = jnp.arange(half)
  return jnp.concatenate([shard * half + r, (2 * num_shards - 1 - shard) * half + r])


def zigzag_order(seq: int, num_shards: int) -> np.ndarray:
  """Row indices in context-layout order (int [seq]): shard 0's tokens, then shard 1's, ..."""
  chunks = np.arange(seq).reshape(2, num_shards, seq // (2 * num_shards))
  return np.stack([chunks[0], chunks[1, ::-1]], axis=1).reshape(-1)


def _mask(q_idx, kv_idx, q_seg, kv_seg, causal: bool):
  """Boolean [B|1, T, S]: a query sees a key of its segment, and (causal) no later key."""
  mask = (kv_idx[None, :] <= q_idx[:, None])[None] if causal else jnp.ones((1, 1, 1), bool)
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def _logits(q, k, scale, soft_cap):
  """q [B, T, K, G, D], k [B, S, K, D] -> (logits f32 [B, K, G, T, S], tanh term or None)."""
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


def _block_fwd(q, k, v, mask, scale, soft_cap):
  """One query block against one key block -> (o f32 [B, T, K, G, D] normalised within the
  block, lse f32 [B, K, G, T]; -inf and zeros for queries that see no key here)."""
  s, _ = _logits(q, k, scale, soft_cap)
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o * _to_rows(jnp.where(l > 0, 1 / jnp.where(l > 0, l, 1.0), 0.0))
  return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _to_rows(x):
  """[B, K, G, T] -> [B, T, K, G, 1], to scale outputs row by row."""
  return x.transpose(0, 3, 1, 2)[..., None]


def _merge(o_a, lse_a, o_b, lse_b):
  """Two partial results over disjoint key sets -> the result over their union."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  inv = jnp.where(total > 0, 1 / jnp.where(total > 0, total, 1.0), 0.0)
  lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  return o_a * _to_rows(w_a * inv) + o_b * _to_rows(w_b * inv), lse


def _block_bwd(q, k, v, do, lse, delta, mask, scale, soft_cap):
  """Gradients of one block given the final lse and delta = sum(do * o) ([B, K, G, T]) ->
  (dq [B, T, K, G, D], dk, dv [B, S, K, D]), float32."""
  s, t = _logits(q, k, scale, soft_cap)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  p = jnp.where(mask[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
  dv = jnp.einsum("bkgts,btkgd->bskd", p, do, preferred_element_type=jnp.float32)
  dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None])
  if t is not None:
    ds = ds * (1 - t * t)
  ds = ds * scale
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=jnp.float32)
  return dq, dk, dv


class _Opts(NamedTuple):
  """The static settings of a ring (hashable: custom_vjp's non-differentiable argument)."""
  scale: float
  soft_cap: float | None
  query_block: int


def _query_chunks(x, n: int, size: int, fill):
  """[B, T, ...] (or a mask [B|1, T, S]) -> [n, B, size, ...], padded with `fill` to n * size."""
  pad = n * size - x.shape[1]
  if pad:
    x = jnp.concatenate([x, jnp.full((x.shape[0], pad, *x.shape[2:]), fill, x.dtype)], axis=1)
  return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _unchunk(x, t: int, axis: int):
  """[n, ...] stacked chunks, each of `size` along `axis` -> joined along it, the first t."""
  x = jnp.moveaxis(x, 0, axis)
  return lax.slice_in_dim(x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:]), 0, t, axis=axis)


def _chunked_fwd(q, k, v, mask, opts: _Opts):
  """_block_fwd over query chunks of opts.query_block (padded queries see nothing), so the
  logits of one step never exceed [B, N, query_block, S] whatever the local length."""
  t, size = q.shape[1], opts.query_block
  if t <= size:
    return _block_fwd(q, k, v, mask, opts.scale, opts.soft_cap)
  n = -(-t // size)
  mask = jnp.broadcast_to(mask, (mask.shape[0], t, k.shape[1]))
  qs, ms = _query_chunks(q, n, size, 0), _query_chunks(mask, n, size, False)
  o, lse = lax.map(lambda a: _block_fwd(a[0], k, v, a[1], opts.scale, opts.soft_cap), (qs, ms))
  return _unchunk(o, t, 1), _unchunk(lse, t, 3)


def _chunked_bwd(q, k, v, do, lse, delta, mask, opts: _Opts):
  """_block_bwd over query chunks; the key/value gradients summed over the chunks."""
  t, size = q.shape[1], opts.query_block
  if t <= size:
    return _block_bwd(q, k, v, do, lse, delta, mask, opts.scale, opts.soft_cap)
  n = -(-t // size)
  mask = jnp.broadcast_to(mask, (mask.shape[0], t, k.shape[1]))
  rows_last = lambda x: jnp.moveaxis(x, -1, 1)  # [B, K, G, T] -> [B, T, K, G]
  chunks = (_query_chunks(q, n, size, 0), _query_chunks(do, n, size, 0),
            _query_chunks(rows_last(lse), n, size, -jnp.inf),
            _query_chunks(rows_last(delta), n, size, 0), _query_chunks(mask, n, size, False))

  def body(acc, c):
    q, do, lse, delta, mask = c
    dq, dk, dv = _block_bwd(q, k, v, do, jnp.moveaxis(lse, 1, -1), jnp.moveaxis(delta, 1, -1),
                            mask, opts.scale, opts.soft_cap)
    return (acc[0] + dk, acc[1] + dv), dq

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dk, dv), dq = lax.scan(body, (zeros(k), zeros(v)), chunks)
  return _unchunk(dq, t, 1), dk, dv


def _halves(x):
  half = x.shape[1] // 2
  return x[:, :half], x[:, half:]


def _block_cases(causal: bool, zigzag_skip: bool):
  """How shard j treats the block of source shard s: 0 all of it (the diagonal, or no causal
  mask); 1 (s < j) all queries against the first half of the keys (the second half comes later
  than every query); 2 (s > j) the second half of the queries against all keys (the first half
  of the queries comes before every key)."""
  def case(j, s):
    if not (causal and zigzag_skip):
      return jnp.zeros((), jnp.int32)
    return jnp.where(s == j, 0, jnp.where(s < j, 1, 2)).astype(jnp.int32)
  return case


def _fwd_block(case, q, k, v, q_seg, kv_seg, q_idx, kv_idx, causal, opts):
  """(o, lse) of the local queries against one travelling key block, by case."""
  def full(_):
    return _chunked_fwd(q, k, v, _mask(q_idx, kv_idx, q_seg, kv_seg, causal), opts)

  def first_keys(_):
    ks, vs, kis = _halves(k)[0], _halves(v)[0], kv_idx[:kv_idx.shape[0] // 2]
    kseg = None if kv_seg is None else _halves(kv_seg)[0]
    return _chunked_fwd(q, ks, vs, _mask(q_idx, kis, q_seg, kseg, causal), opts)

  def last_queries(_):
    qs, qis = _halves(q)[1], q_idx[q_idx.shape[0] // 2:]
    qseg = None if q_seg is None else _halves(q_seg)[1]
    o, lse = _chunked_fwd(qs, k, v, _mask(qis, kv_idx, qseg, kv_seg, causal), opts)
    return (jnp.concatenate([jnp.zeros_like(o), o], axis=1),
            jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=-1))

  return lax.switch(case, (full, first_keys, last_queries), None)


def _bwd_block(case, q, k, v, do, lse, delta, q_seg, kv_seg, q_idx, kv_idx, causal, opts):
  """(dq, dk, dv) of one block, by case (see _block_cases)."""
  def full(_):
    mask = _mask(q_idx, kv_idx, q_seg, kv_seg, causal)
    return _chunked_bwd(q, k, v, do, lse, delta, mask, opts)

  def first_keys(_):
    ks, vs, kis = _halves(k)[0], _halves(v)[0], kv_idx[:kv_idx.shape[0] // 2]
    kseg = None if kv_seg is None else _halves(kv_seg)[0]
    mask = _mask(q_idx, kis, q_seg, kseg, causal)
    dq, dk, dv = _chunked_bwd(q, ks, vs, do, lse, delta, mask, opts)
    pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
    return dq, pad(dk), pad(dv)

  def last_queries(_):
    h = q.shape[1] // 2
    qseg = None if q_seg is None else q_seg[:, h:]
    mask = _mask(q_idx[h:], kv_idx, qseg, kv_seg, causal)
    dq, dk, dv = _chunked_bwd(q[:, h:], k, v, do[:, h:], lse[..., h:], delta[..., h:], mask,
                              opts)
    return jnp.concatenate([jnp.zeros_like(dq), dq], axis=1), dk, dv

  return lax.switch(case, (full, first_keys, last_queries), None)


def _grouped(q, kv_heads: int):
  b, t, n, d = q.shape
  return q.reshape(b, t, kv_heads, n // kv_heads, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, q_seg, kv_seg, axis_name, num_shards, causal, opts):
  return _ring_fwd(q, k, v, q_seg, kv_seg, axis_name, num_shards, causal, opts)[0]


def _shift(x, axis_name, num_shards):
  """Every shard's x to the next shard along the ring."""
  perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _ring_fwd(q, k, v, q_seg, kv_seg, axis_name, num_shards, causal, opts):
  j = lax.axis_index(axis_name)
  case_of = _block_cases(causal, zigzag_skip=q.shape[1] == k.shape[1])
  q_idx = zigzag_index(j, num_shards, q.shape[1])

  def step(i, carry):
    o, lse, k, v, kv_seg = carry
    s = (j - i) % num_shards  # the shard whose keys are here at step i
    kv_idx = zigzag_index(s, num_shards, k.shape[1])
    o_b, lse_b = _fwd_block(case_of(j, s), q, k, v, q_seg, kv_seg, q_idx, kv_idx, causal, opts)
    o, lse = _merge(o, lse, o_b, lse_b)
    return o, lse, k, v, kv_seg

  b, t, kh, g, d = q.shape
  o = jnp.zeros((b, t, kh, g, d), jnp.float32)
  lse = jnp.full((b, kh, g, t), -jnp.inf, jnp.float32)
  # Steps 0 .. n-2 compute then pass the keys on; the last step keeps them.
  carry = lax.fori_loop(0, num_shards - 1,
                        lambda i, c: _pass_on(step(i, c), 2, axis_name, num_shards),
                        (o, lse, k, v, kv_seg))
  o, lse, *_ = step(num_shards - 1, carry)
  return o.astype(q.dtype), (q, k, v, q_seg, kv_seg, o.astype(q.dtype), lse)


def _pass_on(carry: tuple, keep: int, axis_name, num_shards) -> tuple:
  """The first `keep` entries of a ring step's carry stay; the others go to the next shard."""
  return carry[:keep] + tuple(_shift(carry[keep:], axis_name, num_shards))


def _ring_bwd(axis_name, num_shards, causal, opts, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  j = lax.axis_index(axis_name)
  case_of = _block_cases(causal, zigzag_skip=q.shape[1] == k.shape[1])
  q_idx = zigzag_index(j, num_shards, q.shape[1])
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 3, 1)

  def step(i, carry):
    dq, k, v, kv_seg, dk, dv = carry
    s = (j - i) % num_shards
    kv_idx = zigzag_index(s, num_shards, k.shape[1])
    dq_b, dk_b, dv_b = _bwd_block(case_of(j, s), q, k, v, do, lse, delta, q_seg, kv_seg, q_idx,
                                  kv_idx, causal, opts)
    return dq + dq_b, k, v, kv_seg, dk + dk_b, dv + dv_b

  # The key/value gradients travel with their keys; after the last step only they take the
  # final hop, which brings them home.
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  carry = lax.fori_loop(0, num_shards - 1,
                        lambda i, c: _pass_on(step(i, c), 1, axis_name, num_shards),
                        (zeros(q), k, v, kv_seg, zeros(k), zeros(v)))
  dq, *_, dk, dv = step(num_shards - 1, carry)
  dk, dv = _shift((dk, dv), axis_name, num_shards)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, segment_ids=None, *, axis_name: str, num_shards: int,
                   is_causal: bool = True, logits_soft_cap: float | None = None,
                   query_block: int = QUERY_BLOCK):
  """One shard's attention output, the keys and values passing around the ring.

  q: [B, T, N, D] this shard's queries; k, v: [B, T, K, D] (K divides N: grouped-query);
  segment_ids: int [B, T] or None (a query sees only keys of its segment, on any shard).
  T (the local length) must be even: the zig-zag layout's two chunks. -> [B, T, N, D].
  query_block: queries per inner block (the logits of one block are [B, N, query_block, T]).
  """
  b, t, n, d = q.shape
  out = _ring(_grouped(q, k.shape[2]), k, v, segment_ids, segment_ids, axis_name, num_shards,
              is_causal, _Opts(1 / float(np.sqrt(d)), logits_soft_cap, query_block))
  return out.reshape(b, t, n, d)


def all_gather_attention(q, k, v, segment_ids=None, *, axis_name: str, num_shards: int,
                         is_causal: bool = True, logits_soft_cap: float | None = None,
                         implementation: str | None = None, query_block: int = QUERY_BLOCK):
  """As ring_attention, by gathering all keys and values first (same arguments and result;
  the kernel op blocks the queries itself, `implementation` picks it)."""
  del query_block
  t = q.shape[1]
  gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
  k, v = gather(k), gather(v)
  mask = None
  if is_causal:
    q_idx = zigzag_index(lax.axis_index(axis_name), num_shards, t)
    kv_idx = jnp.asarray(zigzag_order(t * num_shards, num_shards))
    mask = (kv_idx[None, :] <= q_idx[:, None])[None, None]
  kv_seg = None if segment_ids is None else gather(segment_ids)
  return kernels.dot_product_attention(
      q, k, v, mask=mask, query_segment_ids=segment_ids, kv_segment_ids=kv_seg,
      logits_soft_cap=logits_soft_cap, implementation=implementation)

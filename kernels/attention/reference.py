"""``implementation="xla"``: plain jnp attention, the reference every other backend is tested
against, and the CPU default at short sequence lengths (what the LM trains with on CPU).

Materializes the logits, so memory is O(T * S). Gradients come from JAX autodiff. Written for
XLA:CPU speed: hand-written einsums (no per-head vmap), GQA through a free reshape instead of
repeating keys, masks as one ``where`` over cheap iota comparisons, a softmax with
``jax.nn.softmax``'s cheap custom JVP, and causal or sliding-window attention cut into blocks of
``block_q`` queries, each against only the keys its window reaches (the hidden part of the
``[T, S]`` logits is never computed). Blocking pays beyond the skipped work: at nanoGPT's
default size ([64, 256, 6, 64], causal) the forward and backward take 0.55-0.6x the time of the
unblocked form on JAX 0.10 and 0.8x on 0.12 with 128-query blocks (2 CPU cores; at T <= 128 it
is one block, as before).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import common


def grouped_bias(x, num_kv_heads: int):
  """``[b, n, t, s]`` (n in {1, num_heads}) -> ``[b, kv_heads|1, groups|1, t, s]``."""
  if x is None:
    return None
  b, n, t, s = x.shape
  if n == 1:
    return x[:, :, None]
  return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


@jax.custom_jvp
def safe_softmax(s):
  """Softmax over the last axis in float32 where a row of all -inf gives zeros, not NaN.

  A custom JVP (the one of ``jax.nn.softmax``: ``p * (ds - sum(p * ds))``) keeps the backward
  pass to a few elementwise passes over the ``[.., T, S]`` logits, and gives exact zeros for
  hidden keys and empty rows.
  """
  # The max is a constant shift of each row (no gradient through it).
  m = jax.lax.stop_gradient(common.safe_max(jnp.max(s, axis=-1, keepdims=True)))
  p = jnp.exp(s - m)
  return p * common.safe_reciprocal(jnp.sum(p, axis=-1, keepdims=True))


@safe_softmax.defjvp
def _safe_softmax_jvp(primals, tangents):
  (s,), (ds,) = primals, tangents
  p = safe_softmax(s)
  return p, p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))


# Queries per block of causal or sliding-window attention (None: one block). 128 measured
# best on 2 CPU cores at T = 256 and 512 (64 and 256 are 5-20% slower).
BLOCK_Q = 128


def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False,
              block_q: int | None = BLOCK_Q):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  bias/mask: ``[B|1, N|1, T|1, S|1]``; segment ids ``[B, T]`` / ``[B, S]`` int32.
  block_q: with a causal or local window, queries in blocks of this many rows, each block
  against the keys ``common.kv_block_range`` gives it; None: all queries against all keys.
  """
  del interpret  # Nothing to interpret: plain XLA.
  if block_q is not None and (not isinstance(block_q, int) or block_q < 1):
    raise ValueError(f"block_q={block_q!r}: must be an integer >= 1, or None for one block")
  t, s_len = query.shape[1], key.shape[1]
  if window.is_full or block_q is None or t <= block_q:
    return _attend(query, key, value, bias, mask, query_segment_ids, kv_segment_ids,
                   q_start=0, k_start=0, scale=scale, window=window, soft_cap=soft_cap)
  outputs = []
  for q_start in range(0, t, block_q):
    q_end = min(q_start + block_q, t)
    lo, hi = common.kv_block_range(q_start, q_end, window, 1, s_len)
    if hi <= lo:  # the window hides every key from these queries
      outputs.append(jnp.zeros_like(query[:, q_start:q_end]))
      continue
    rows = lambda x: None if x is None else x[:, q_start:q_end]
    keys = lambda x: None if x is None else x[:, lo:hi]
    outputs.append(_attend(
        rows(query), keys(key), keys(value), _crop(bias, q_start, q_end, lo, hi),
        _crop(mask, q_start, q_end, lo, hi), rows(query_segment_ids), keys(kv_segment_ids),
        q_start=q_start, k_start=lo, scale=scale, window=window, soft_cap=soft_cap))
  return jnp.concatenate(outputs, axis=1)


def _crop(x, q_start: int, q_end: int, k_start: int, k_end: int):
  """Rows ``[q_start, q_end)`` and columns ``[k_start, k_end)`` of a ``[.., T|1, S|1]`` bias or
  mask (a broadcast axis of size 1 stays as it is)."""
  if x is None:
    return None
  t, s = x.shape[-2:]
  if t > 1:
    x = x[..., q_start:q_end, :]
  return x[..., k_start:k_end] if s > 1 else x


def _attend(query, key, value, bias, mask, query_segment_ids, kv_segment_ids, *, q_start: int,
            k_start: int, scale: float, window: common.Window, soft_cap: float | None):
  """``attention`` of queries at positions ``q_start + [0, T)`` against keys at positions
  ``k_start + [0, S)``; the arguments are those rows and columns."""
  b, t, n, d = query.shape
  s_len, kv_heads = key.shape[1], key.shape[2]
  groups = n // kv_heads
  if groups == 1:
    # MHA: 4-D einsums (the grouped 5-D form below costs XLA:CPU ~20-30% more).
    q, qk_eq, pv_eq = query, "bthd,bshd->bhts", "bhts,bshd->bthd"
    view = lambda x: x
  else:
    # GQA/MQA: [B, T, K, G, D] view, so that keys are shared without being repeated.
    q = query.reshape(b, t, kv_heads, groups, d)
    qk_eq, pv_eq = "btkgd,bskd->bkgts", "bkgts,bskd->btkgd"
    view = lambda x: None if x is None else grouped_bias(x, kv_heads)
  # Logits in float32 whatever the input dtype (as jax.nn does).
  s = jnp.einsum(qk_eq, q, key, preferred_element_type=jnp.float32)
  s = common.transform_logits(s, scale=scale, bias=view(bias), soft_cap=soft_cap)
  seg = None
  if query_segment_ids is not None:
    seg = common.segment_mask(query_segment_ids, kv_segment_ids)[:, None]  # [B, 1, T, S]
    if groups > 1:
      seg = seg[:, None]
  visible = common.and_masks(
      common.position_mask(q_start + jnp.arange(t), k_start + jnp.arange(s_len), window),
      view(mask), seg)
  p = safe_softmax(common.apply_mask(s, visible))
  o = jnp.einsum(pv_eq, p.astype(value.dtype), value, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, d).astype(query.dtype)


def unsupported_reason(args) -> str | None:
  """Serves every argument combination (it is the reference)."""
  del args
  return None

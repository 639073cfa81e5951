"""``implementation="xla"``: plain jnp attention, the reference every other backend is tested
against, and the CPU default at short sequence lengths (what the LM trains with on CPU).

Materializes the ``[batch, heads, T, S]`` logits, so memory is O(T * S). Gradients come from
JAX autodiff. Written for XLA:CPU speed: hand-written einsums (no per-head vmap), GQA through a
free reshape instead of repeating keys, masks as one ``where`` over cheap iota comparisons, and
a softmax with ``jax.nn.softmax``'s cheap custom JVP.
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


def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  bias/mask: ``[B|1, N|1, T|1, S|1]``; segment ids ``[B, T]`` / ``[B, S]`` int32.
  """
  del interpret  # Nothing to interpret: plain XLA.
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
      common.position_mask(jnp.arange(t), jnp.arange(s_len), window), view(mask), seg)
  p = safe_softmax(common.apply_mask(s, visible))
  o = jnp.einsum(pv_eq, p.astype(value.dtype), value, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, d).astype(query.dtype)


def unsupported_reason(args) -> str | None:
  """Serves every argument combination (it is the reference)."""
  del args
  return None

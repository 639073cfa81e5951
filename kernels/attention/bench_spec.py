"""Attention as the bench tool sees it (``--op=attention``), and its FLOP count.

Shapes ``BxTxHxD``: batch, sequence, heads, head dim; causal self-attention. FLOPs count the
visible (query, key) pairs only (``attention_flops``); bytes: q, k, v, out (and do, dq, dk,
dv plus re-reads in the backward). ``python -m kernels.attention.bench`` uses the same count.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from . import IMPLEMENTATIONS, dot_product_attention
from ..bench.spec import OpSpec, itemsize, normal


def visible_pairs(q_len: int, kv_len: int, causal: bool = False, window=None) -> int:
  """Number of (query, key) pairs attended: causal/window skip the rest (top-left aligned)."""
  if not causal and window is None:
    return q_len * kv_len
  left, right = (None, None) if window is None else (
      (window, window) if isinstance(window, int) else window)
  if causal:
    right = 0 if right is None else min(right, 0)
  i = np.arange(q_len)
  lo = np.zeros(q_len, np.int64) if left is None else np.maximum(i - left, 0)
  hi = np.full(q_len, kv_len - 1) if right is None else np.minimum(i + right, kv_len - 1)
  return int(np.maximum(hi - lo + 1, 0).sum())


def attention_flops(batch: int, q_len: int, kv_len: int, num_heads: int, head_dim: int, *,
                    causal: bool = False, window=None, backward: bool = False) -> float:
  """Matmul FLOPs: forward 2 matmuls (q k^T, p v) = 4 * pairs * head_dim per head; the
  backward adds 5 (recomputed s, dv, dp, dq, dk), so forward+backward = 3.5x forward."""
  fwd = 4.0 * batch * num_heads * head_dim * visible_pairs(q_len, kv_len, causal, window)
  return fwd * 3.5 if backward else fwd


def _inputs(dims, dtype, key):
  b, t, h, d = dims
  ks = jax.random.split(key, 3)
  return tuple(normal(k, (b, t, h, d), dtype) for k in ks), (0, 1, 2)


def _run(impl, args, interpret):
  return dot_product_attention(*args, is_causal=True, implementation=impl, interpret=interpret)


def _flops(dims, mode):
  b, t, h, d = dims
  return float(attention_flops(b, t, t, h, d, causal=True, backward=mode == "fwd_bwd"))


SPECS = {
    "attention": OpSpec(
        "attention", "BxTxHxD", 4, ("4x1024x16x64", "2x4096x16x128"), tuple(IMPLEMENTATIONS),
        _inputs, _run, flops=_flops,
        bytes=lambda dims, dt, mode: (math.prod(dims) * itemsize(dt)
                                      * (12 if mode == "fwd_bwd" else 4)),
        size=lambda dims: dims[0] * dims[2] * dims[1] * dims[1], size_doc="B*H*T*T",
        memory_bound=False),
}

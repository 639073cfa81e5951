"""Attention as the bench tool sees it (``--op=attention``), and its FLOP count.

Shapes ``BxTxHxD``: batch, sequence, heads, head dim; causal self-attention. FLOPs count the
visible (query, key) pairs only (``attention_flops``); bytes: q, k, v, out (and do, dq, dk,
dv plus re-reads in the backward). ``python -m kernels.attention.bench`` uses the same count.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from . import IMPLEMENTATIONS, dot_product_attention
from ..bench.spec import OpSpec, Sweep, itemsize, normal


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


def _run(impl, args, interpret, causal=True):
  return dot_product_attention(*args, is_causal=causal, implementation=impl, interpret=interpret)


def _flops(dims, mode, causal=True):
  b, t, h, d = dims
  return float(attention_flops(b, t, t, h, d, causal=causal, backward=mode == "fwd_bwd"))


def _mosaic_gpu_sweeps(dims, dtype, interpret, causal=True):
  """One sweep over ``mosaic_gpu.autotune_candidates`` (forward and backward tiles and the TMA
  ring depth in one ``BlockSizes``), timing forward + VJP: the cache holds one entry,
  ``attention_mosaic_gpu.fwd`` at ``(T, S, head_dim)``, that all three kernels read."""
  import inspect
  from . import common, mosaic_gpu as mod
  b, t, h, d = dims
  if "block_sizes" not in inspect.signature(mod.attention).parameters:
    raise TypeError("kernels.attention.mosaic_gpu.attention takes no block_sizes=")
  (q, k, v), _ = _inputs(dims, dtype, jax.random.key(1))
  do = normal(jax.random.key(2), q.shape, dtype)
  window = common.make_window(causal, None)

  def make(bs):
    def f(q, k, v, do):
      out, vjp = jax.vjp(lambda q, k, v: mod.attention(
          q, k, v, None, None, None, None, scale=d ** -0.5, window=window, interpret=interpret,
          block_sizes=bs), q, k, v)
      return out, vjp(do)
    return f
  default = mod.BlockSizes.default(t, t, d, dtype).fit(t, t)  # the baseline first
  cands = [default] + [c for c in mod.autotune_candidates(t, t, d, dtype) if c != default]
  return [Sweep(f"{mod.AUTOTUNE_OP}.fwd", (t, t, d), cands, make, (q, k, v, do),
                as_dict=dataclasses.asdict)]


def with_causal(causal: bool) -> OpSpec:
  """The attention spec with ``is_causal=causal`` (the default spec is causal): the GPU report
  measures both."""
  return dataclasses.replace(SPECS["attention"], run=functools.partial(_run, causal=causal),
                             flops=functools.partial(_flops, causal=causal))


SPECS = {
    "attention": OpSpec(
        "attention", "BxTxHxD", 4, ("4x1024x16x64", "2x4096x16x128"), tuple(IMPLEMENTATIONS),
        _inputs, _run, flops=_flops,
        bytes=lambda dims, dt, mode: (math.prod(dims) * itemsize(dt)
                                      * (12 if mode == "fwd_bwd" else 4)),
        size=lambda dims: dims[0] * dims[2] * dims[1] * dims[1], size_doc="B*H*T*T",
        memory_bound=False, mosaic_gpu_sweeps=_mosaic_gpu_sweeps),
}

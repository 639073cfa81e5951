"""``implementation="cudnn"``: cuDNN's fused attention through ``jax.nn.dot_product_attention``.

For comparison in benchmarks; never chosen by default. Serves the subset of arguments cuDNN
takes: float16/bfloat16, head_dim a multiple of 8 up to 128 (256 on recent cuDNN, left out
here), no segment ids, boolean mask or soft cap, windows only to the left (causal sliding windows).
"""
from __future__ import annotations

import jax

from . import common


def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]``."""
  del interpret
  assert query_segment_ids is None and kv_segment_ids is None and soft_cap is None
  # The window is causal (right == 0) here: cuDNN's sliding window is (left, 0).
  is_causal = window.right == 0
  local = None if window.left is None else (window.left, 0)
  return jax.nn.dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      local_window_size=local, implementation="cudnn")


def unsupported_reason(args) -> str | None:
  if args.dtype not in ("float16", "bfloat16"):
    return f"dtype {args.dtype} (cuDNN attention takes float16 or bfloat16)"
  if args.head_dim % 8 or args.head_dim > 128:
    return f"head_dim {args.head_dim} (cuDNN needs a multiple of 8, at most 128)"
  if args.has_segment_ids:
    return "segment ids (not exposed by jax.nn.dot_product_attention's cuDNN path)"
  if args.has_mask:
    return ("boolean mask (rows it hides entirely would not come back as zeros); pass an "
            "additive bias instead")
  if args.soft_cap is not None:
    return "logits_soft_cap"
  w = args.window
  if not w.is_full and w.right != 0:
    return f"local window {w} (cuDNN only takes windows that end at the query: right == 0)"
  if args.platform != "gpu":
    return (f"cuDNN runs on NVIDIA GPUs, not on {args.platform!r} (jax.nn would raise a bare "
            f"'cuDNN is not detected'); use 'xla' or 'xla_chunked' there")
  return None

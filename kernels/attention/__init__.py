"""Fused, memory-efficient dot-product attention with interchangeable implementations.

``dot_product_attention`` validates its arguments, picks an implementation and calls it. Each
implementation is one file beside this one with the same two functions:
  * ``attention(query, key, value, bias, mask, query_segment_ids, kv_segment_ids, *, scale,
    window, soft_cap, interpret)`` -> output, differentiable in query, key, value and bias;
  * ``unsupported_reason(args: AttentionArgs) -> str | None``: why it cannot serve the call.
  * optionally ``interpret_reason(args)``: the same under ``interpret=True`` (a GPU kernel
    interpreted on a CPU host need not decline the host platform), and
    ``unavailable_reason()``: why it cannot run in this process at all (JAX version, GPU
    generation); the default selection then skips it without a warning.
Adding a backend (e.g. ``mosaic_tpu``, ``mosaic_gpu``) = one file, one entry in ``IMPLEMENTATIONS`` (and in
``PALLAS_IMPLEMENTATIONS`` / ``DEFAULT_ORDER`` as it applies). The masking rules all backends
share live in ``common.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings

import jax.numpy as jnp
import numpy as np

from .. import platforms
from . import common

# name -> module (imported on first use, so the Pallas backends cost nothing until called).
IMPLEMENTATIONS = {
    "xla": ".reference",
    "xla_chunked": ".xla_chunked",
    "triton": ".triton",
    "cudnn": ".cudnn",
    "mosaic_tpu": ".mosaic_tpu",
    "mosaic_gpu": ".mosaic_gpu",
}
# Pallas kernels: the ones ``interpret=True`` applies to. With interpret=True and
# implementation=None the first that serves the arguments runs: "triton" stays first (it serves
# float32 and every head dim, and runs on JAX 0.10).
PALLAS_IMPLEMENTATIONS = ("triton", "mosaic_tpu", "mosaic_gpu")
# implementation=None: the first that serves the arguments, per platform. CPU is special:
# "xla" for short sequences (fastest there), "xla_chunked" beyond CPU_XLA_MAX_LOGITS. On GPU,
# "mosaic_gpu" (JAX >= 0.11, Hopper) first; on older JAX it declines and "triton" serves.
DEFAULT_ORDER = {
    "gpu": ("mosaic_gpu", "triton", "xla_chunked"),
    "tpu": ("mosaic_tpu", "xla_chunked"),
    "cpu": ("xla", "xla_chunked"),
}
# T * S above which the CPU default switches from "xla" (O(T * S) logits) to "xla_chunked"
# (measured on 2 CPU cores: chunked is as fast at 512 x 512 and 2-3x faster from 1024 x 1024).
CPU_XLA_MAX_LOGITS = 512 * 1024

_warned: set = set()


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
  """What an implementation needs to know to say whether it can serve a call."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: str
  has_bias: bool
  has_mask: bool
  has_segment_ids: bool
  window: common.Window
  soft_cap: float | None
  platform: str


def _module(name: str):
  return importlib.import_module(IMPLEMENTATIONS[name], __name__)


def _platform() -> str:
  # jax.default_backend(), unless a kernels.target_platform(...) block says otherwise.
  return platforms.current()


def _unsupported_reason(name: str, args: AttentionArgs, interpret: bool) -> str | None:
  # Interpret mode runs a GPU kernel on any host: a backend may then check less (the platform).
  module = _module(name)
  check = getattr(module, "interpret_reason", None) if interpret else None
  return (check or module.unsupported_reason)(args)


def _shape_str(**arrays) -> str:
  return ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if v is not None)


def _check_broadcastable(name, x, target, *, bool_dtype: bool):
  if x is None:
    return None
  x = jnp.asarray(x)
  want = "[batch|1, num_heads|1, T|1, S|1] = " + str(target)
  if x.ndim != 4 or any(a not in (1, b) for a, b in zip(x.shape, target)):
    raise ValueError(f"{name} must have rank 4 and broadcast to {want}; got {name} shape "
                     f"{tuple(x.shape)}")
  if bool_dtype and x.dtype != jnp.bool_:
    raise ValueError(f"{name} must be boolean (True = attend); got dtype {x.dtype}. Pass an "
                     f"additive mask as bias.")
  if not bool_dtype and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got dtype {x.dtype}")
  return x


def _check_segment_ids(name, x, want_shape, length_name):
  x = jnp.asarray(x)
  if x.shape != want_shape:
    raise ValueError(f"{name} must have shape [batch, {length_name}] = {want_shape}; got "
                     f"{name} shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers; got dtype {x.dtype}")
  return x.astype(jnp.int32)


def _normalize_window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)):
    pair = (int(local_window_size), int(local_window_size))
  else:
    try:
      pair = tuple(int(w) for w in local_window_size)
    except TypeError:
      pair = ()
    if len(pair) != 2:
      raise ValueError("local_window_size must be an int or a pair (left, right) of ints; "
                       f"got {local_window_size!r}")
  if min(pair) < 0:
    raise ValueError(f"local_window_size must be >= 0; got {local_window_size!r}")
  return pair


def _validate(query, key, value, bias, mask, scale, query_segment_ids, kv_segment_ids,
              local_window_size, logits_soft_cap):
  shapes = _shape_str(query=query, key=key, value=value)
  for name, x, axes in (("query", query, "[batch, T, num_heads, head_dim]"),
                        ("key", key, "[batch, S, num_kv_heads, head_dim]"),
                        ("value", value, "[batch, S, num_kv_heads, head_dim]")):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 {axes}; got {name} shape {tuple(x.shape)} "
                       f"({shapes})")
  b, t, n, d = query.shape
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape; got {shapes}")
  if key.shape[0] != b:
    raise ValueError(f"batch size of query ({b}) and key/value ({key.shape[0]}) differ: "
                     f"{shapes}")
  if key.shape[3] != d:
    raise ValueError(f"head_dim of query ({d}) and key/value ({key.shape[3]}) differ: {shapes}")
  s, k = key.shape[1], key.shape[2]
  if k == 0 or n % k:
    raise ValueError(f"num_heads of query ({n}) must be a multiple of num_kv_heads of "
                     f"key/value ({k}): {shapes}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value must share one dtype; got query {query.dtype}, "
                     f"key {key.dtype}, value {value.dtype}")
  if not jnp.issubdtype(query.dtype, jnp.floating):
    raise ValueError(f"query/key/value must be floating point; got dtype {query.dtype}")
  target = (b, n, t, s)
  bias = _check_broadcastable("bias", bias, target, bool_dtype=False)
  mask = _check_broadcastable("mask", mask, target, bool_dtype=True)
  if query_segment_ids is None and kv_segment_ids is not None or (
      kv_segment_ids is None and query_segment_ids is not None):
    # Self-attention: one set of ids serves both sides.
    if t != s:
      given = "query_segment_ids" if kv_segment_ids is None else "kv_segment_ids"
      raise ValueError(f"{given} given without the other and T ({t}) != S ({s}): pass both "
                       f"query_segment_ids [batch, T] and kv_segment_ids [batch, S]")
    query_segment_ids = kv_segment_ids = (
        query_segment_ids if kv_segment_ids is None else kv_segment_ids)
  if query_segment_ids is not None:
    query_segment_ids = _check_segment_ids("query_segment_ids", query_segment_ids, (b, t), "T")
    kv_segment_ids = _check_segment_ids("kv_segment_ids", kv_segment_ids, (b, s), "S")
  window = _normalize_window(local_window_size)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be > 0; got {logits_soft_cap!r}")
  if scale is None:
    scale = 1.0 / float(np.sqrt(d))
  return bias, mask, query_segment_ids, kv_segment_ids, window, float(scale)


def _warn_once(message: str):
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=4)


def _select(implementation, args: AttentionArgs, interpret: bool) -> str:
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={implementation!r} is not one of "
                       f"{[None] + list(IMPLEMENTATIONS)}")
    if interpret and implementation not in PALLAS_IMPLEMENTATIONS:
      raise ValueError(f"interpret=True applies to the Pallas implementations "
                       f"{list(PALLAS_IMPLEMENTATIONS)}; got implementation="
                       f"{implementation!r}")
    reason = _unsupported_reason(implementation, args, interpret)
    if reason is not None:
      raise ValueError(
          f"implementation={implementation!r} cannot serve these arguments: {reason} (query "
          f"[{args.batch}, {args.q_len}, {args.num_heads}, {args.head_dim}], key/value "
          f"[{args.batch}, {args.kv_len}, {args.num_kv_heads}, {args.head_dim}], "
          f"dtype {args.dtype}). Use implementation=None to pick one that can.")
    return implementation
  if interpret:
    order = PALLAS_IMPLEMENTATIONS
  elif args.platform == "cpu":
    order = ("xla",) if args.q_len * args.kv_len <= CPU_XLA_MAX_LOGITS else ("xla_chunked",)
  else:
    order = DEFAULT_ORDER.get(args.platform, ("xla_chunked",))
  skipped = []
  for name in order:
    unavailable = getattr(_module(name), "unavailable_reason", None)
    if unavailable is not None and unavailable() is not None:
      continue  # not a fallback: this backend does not exist here
    reason = _unsupported_reason(name, args, interpret)
    if reason is None:
      if skipped:
        _warn_once(f"dot_product_attention: {'; '.join(skipped)}; falling back to {name!r}.")
      return name
    skipped.append(f"{name!r} cannot serve these arguments ({reason})")
  # "xla" serves everything: the last resort, never silently wrong.
  _warn_once(f"dot_product_attention: {'; '.join(skipped)}; falling back to 'xla'.")
  return "xla"


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_segment_ids=None, kv_segment_ids=None,
                          local_window_size=None, logits_soft_cap=None, implementation=None,
                          interpret=False):
  """Scaled dot-product attention, ``softmax(scale * q k^T + bias, masked) v``, fused.

  Args:
    query: ``[batch, T, num_heads, head_dim]``.
    key, value: ``[batch, S, num_kv_heads, head_dim]``; ``num_heads % num_kv_heads == 0``
      (MHA, GQA, MQA).
    bias: optional, added to the scaled logits; rank 4, broadcastable to
      ``[batch, num_heads, T, S]``. Differentiable.
    mask: optional boolean, True = attend; rank 4, broadcastable like bias.
    scale: logit scale; default ``1 / sqrt(head_dim)``.
    is_causal: query i sees keys j <= i (aligned at the top left, as jax.nn).
    query_segment_ids, kv_segment_ids: ``[batch, T]`` / ``[batch, S]`` integers; a query sees
      only keys with its id (packed sequences, padding). For self-attention one of them may
      be given alone.
    local_window_size: int or ``(left, right)``: query i sees keys ``i - left <= j <= i +
      right``.
    logits_soft_cap: c > 0: logits become ``c * tanh(logits / c)`` (after scale and bias,
      before the mask).
    implementation: None (the best for the backend and arguments; falls back with a one-time
      warning), "xla", "xla_chunked", "triton", "cudnn", "mosaic_tpu" or "mosaic_gpu" (Hopper,
      JAX >= 0.11, bf16/f16, head_dim 64/128/256).
    interpret: run the Pallas kernel in interpret mode (CPU tests of the kernel code).

  Returns:
    ``[batch, T, num_heads, head_dim]`` in the query's dtype. A query row with no visible key
    returns zeros (with zero gradients), never NaN.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  bias, mask, q_seg, kv_seg, window, scale = _validate(
      query, key, value, bias, mask, scale, query_segment_ids, kv_segment_ids,
      local_window_size, logits_soft_cap)
  b, t, n, d = query.shape
  w = common.make_window(bool(is_causal), window)
  args = AttentionArgs(
      batch=b, q_len=t, kv_len=key.shape[1], num_heads=n, num_kv_heads=key.shape[2],
      head_dim=d, dtype=str(query.dtype), has_bias=bias is not None,
      has_mask=mask is not None, has_segment_ids=q_seg is not None, window=w,
      soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      platform=_platform())
  name = _select(implementation, args, bool(interpret))
  kwargs = dict(scale=scale, window=w, soft_cap=args.soft_cap)
  if name in PALLAS_IMPLEMENTATIONS:
    kwargs["interpret"] = bool(interpret)
  return _module(name).attention(query, key, value, bias, mask, q_seg, kv_seg, **kwargs)


__all__ = ["dot_product_attention", "IMPLEMENTATIONS", "AttentionArgs"]

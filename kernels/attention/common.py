"""Masking and logit helpers shared by every attention implementation.

Everything here works on one *tile* of logits, ``[..., bq, bk]``, built from plain ``jnp``
ops on positions and ids, so the same code runs in the plain-XLA reference (the tile is the
whole matrix), the blockwise XLA loop, the Pallas Triton kernel and a later Mosaic TPU kernel.

Semantics (the same as ``jax.nn.dot_product_attention`` where the arguments overlap):
  logits = scale * q @ k^T  (+ bias)  -> soft cap ``cap * tanh(logits / cap)`` -> mask.
  Query row ``i`` may see key ``j`` iff
    * ``mask[..., i, j]`` is True (when a boolean mask is given),
    * ``j <= i`` (``is_causal``; positions are aligned at the top left, as in jax.nn),
    * ``i - left <= j <= i + right`` (``local_window_size=(left, right)``),
    * ``query_segment_ids[i] == kv_segment_ids[j]`` (when segment ids are given),
    * ``j < kv_len`` (keys added by internal padding are never visible).
  A row that sees no key at all gives a zero output and zero gradients (jax.nn would average
  the values of all keys instead; we treat "nothing visible" as "nothing attended").
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Logits of hidden keys. -inf keeps hidden keys at exactly zero probability even when the
# visible logits are very negative; the online softmax below guards the all-hidden case.
MASKED = -math.inf


@dataclasses.dataclass(frozen=True)
class Window:
  """Visible key offsets relative to the query position: ``i - left <= j <= i + right``.

  ``None`` means unbounded on that side. Causal attention is ``Window(None, 0)``.
  """
  left: int | None = None
  right: int | None = None

  @property
  def is_full(self) -> bool:
    return self.left is None and self.right is None


def make_window(is_causal: bool, local_window_size) -> Window:
  """Combines ``is_causal`` and ``local_window_size`` (int or (left, right)) into one Window."""
  left = right = None
  if local_window_size is not None:
    if isinstance(local_window_size, int):
      left = right = int(local_window_size)
    else:
      left, right = (int(w) for w in local_window_size)
  if is_causal:
    right = 0 if right is None else min(right, 0)
  return Window(left, right)


def position_mask(q_pos, k_pos, window: Window, kv_len: int | None = None):
  """Boolean ``[bq, bk]`` from query positions ``[bq]`` and key positions ``[bk]``, or None.

  ``kv_len``: keys at positions ``>= kv_len`` (internal padding) are hidden; pass None when
  the tile has no padded keys.
  """
  q = q_pos[:, None]
  k = k_pos[None, :]
  mask = None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if window.right is not None:
    mask = both(mask, k <= q + window.right)
  if window.left is not None:
    mask = both(mask, k >= q - window.left)
  if kv_len is not None:
    mask = both(mask, k < kv_len)
  return mask


def segment_mask(q_seg, k_seg):
  """``[..., bq]`` and ``[..., bk]`` segment ids -> boolean ``[..., bq, bk]``."""
  return q_seg[..., :, None] == k_seg[..., None, :]


def and_masks(*masks):
  """Logical and of the masks that are not None (None if all are None)."""
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else jnp.logical_and(out, m)
  return out


def transform_logits(s, *, scale: float, bias=None, soft_cap: float | None = None):
  """Raw ``q @ k^T`` (float32) -> logits before masking: scale, add bias, soft cap."""
  s = s * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  return s


def soft_cap_grad(capped, soft_cap: float | None):
  """d capped / d uncapped, from the capped logits: ``1 - tanh^2``; None when no cap."""
  if soft_cap is None:
    return None
  t = capped / soft_cap
  return 1.0 - t * t


def apply_mask(s, mask):
  return s if mask is None else jnp.where(mask, s, MASKED)


def safe_max(m):
  """Row maxima with -inf (a row with nothing visible yet) replaced by 0, so that
  ``exp(s - m)`` is ``exp(-inf) = 0`` there instead of ``exp(nan)``."""
  return jnp.where(m == MASKED, 0.0, m)


def finalize_lse(m, l):
  """Log-sum-exp residual from the running max ``m`` and sum ``l`` of a finished row.

  A row with nothing visible (``l == 0``) gets ``+inf``: the backward pass recomputes
  ``p = exp(s - lse)`` and gets exactly 0 for every key of that row.
  """
  return jnp.where(l == 0.0, math.inf, m + jnp.log(jnp.where(l == 0.0, 1.0, l)))


def safe_reciprocal(l):
  """1 / l with 1/0 -> 0: an empty row's output (and its gradients) stay exactly zero."""
  return jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))


# --- Block ranges: which key blocks a query block can see, and the reverse. -------------------
# The bounds work on Python ints and on traced int32 scalars (inside Pallas kernels and loops).
# Blocks outside the range are fully hidden by the causal/window mask, so loops skip them.

def _cdiv(a, b: int):
  if isinstance(a, int):
    return -(-a // b)
  return lax.div(a + (b - 1), b)


def _floordiv_nonneg(a, b: int):
  return a // b if isinstance(a, int) else lax.div(a, b)


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def kv_block_range(q_start, q_end, window: Window, block_k: int, num_k_blocks: int):
  """Key blocks ``[lo, hi)`` that query rows ``[q_start, q_end)`` may see (hi <= lo: none)."""
  lo = 0
  hi = num_k_blocks
  if window.left is not None:
    lo = _floordiv_nonneg(_max(q_start - window.left, 0), block_k)
  if window.right is not None:
    hi = _min(_cdiv(_max(q_end + window.right, 0), block_k), num_k_blocks)
  return lo, hi


def q_block_range(k_start, k_end, window: Window, block_q: int, num_q_blocks: int):
  """Query blocks ``[lo, hi)`` that may see key rows ``[k_start, k_end)``."""
  lo = 0
  hi = num_q_blocks
  if window.right is not None:
    lo = _floordiv_nonneg(_max(k_start - window.right, 0), block_q)
  if window.left is not None:
    hi = _min(_cdiv(_max(k_end + window.left, 0), block_q), num_q_blocks)
  return lo, hi


def full(shape, value, dtype, like):
  """``jnp.full`` for loop carries: under ``shard_map`` the value must vary over the same mesh
  axes as the data it is combined with (``like``), or ``fori_loop`` rejects the carry."""
  return lax.full_like(like, value, dtype, shape)


def reduce_to_shape(x, shape):
  """Sums a broadcast result back to ``shape`` (the cotangent of a broadcast)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  if axes:
    x = jnp.sum(x, axis=axes, keepdims=True)
  return x.reshape(shape)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def flash_with_vjp(forward, backward):
  """A flash-attention op differentiated by its own backward pass.

  ``forward(*arrays, c) -> (out, lse)`` and ``backward(*arrays, out, lse, do, c) -> grads``, where
  ``arrays`` are q, k, v followed by the optional bias, mask and segment ids, ``c`` is the static
  (hashable) configuration, and ``grads`` covers the leading arrays (q, k, v and a bias); the
  masks and segment ids that follow get no gradient. Returns ``flash(c, *arrays) -> out``, which
  saves only the inputs, the output and the log-sum-exp for the backward pass.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(c, *arrays):
    return forward(*arrays, c)[0]

  def flash_fwd(c, *arrays):
    out, lse = forward(*arrays, c)
    return out, (arrays, out, lse)

  def flash_bwd(c, residuals, do):
    arrays, out, lse = residuals
    grads = tuple(backward(*arrays, out, lse, do, c))
    return grads + (None,) * (len(arrays) - len(grads))

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def pad_axis(x, axis: int, size: int, *, broadcast: bool = False):
  """Zero-pads ``axis`` to ``size``; ``broadcast``: a length-1 axis (bias/mask) stays as is."""
  if x is None or x.shape[axis] == size or (broadcast and x.shape[axis] == 1):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)

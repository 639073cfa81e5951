"""Rotary position embeddings (RoPE; Su et al. 2021), as LLaMA and GPT-NeoX apply them.

Each head's vector is split into two halves (x1, x2) and the pair (x1[i], x2[i]) is rotated by
the angle `position * theta ** (-2i / head_dim)`. A query at position m and a key at position n
then score `q . k` as a function of their contents and of `m - n` only, which is why no position
table is learned and why a KV cache can store keys already rotated.
"""
import math

import jax.numpy as jnp

SCALINGS = ("linear", "llama3")


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: tuple | None = None):
  """-> float32 [head_dim // 2]: the rotation speed of each pair.

  scaling: None, or (key, value) pairs as in a Hugging Face config's rope_scaling:
    ("rope_type", "linear"), ("factor", f): every speed / f (positions interpolated; Chen et al.
      2023).
    ("rope_type", "llama3"), ("factor", f), ("low_freq_factor", l), ("high_freq_factor", h),
      ("original_max_position_embeddings", n): Llama 3.1's: wavelengths longer than n / l are
      slowed by f, shorter than n / h kept, those between blended smoothly.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if not scaling:
    return freqs
  s = dict(scaling)
  kind, factor = s.get("rope_type"), float(s["factor"])
  if kind == "linear":
    return freqs / factor
  if kind != "llama3":
    raise ValueError(f"rope scaling {kind!r}: must be one of {', '.join(SCALINGS)}")
  low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
  context = float(s["original_max_position_embeddings"])
  wavelength = 2 * math.pi / freqs
  smooth = (context / wavelength - low) / (high - low)
  blended = (1 - smooth) * freqs / factor + smooth * freqs
  return jnp.where(wavelength > context / low, freqs / factor,
                   jnp.where(wavelength < context / high, freqs, blended))


def apply_rope(x, positions, *, theta: float = 10000.0, scaling: tuple | None = None):
  """x: [batch, seq, heads, head_dim]; positions: int [batch, seq] -> x rotated, same dtype.

  The "rotate half" layout (pairs are (i, i + head_dim/2)), as Hugging Face's LLaMA; angles are
  computed in float32 from the integer positions, so position 4000 is as exact as position 4.
  """
  head_dim = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta, scaling)
  cos = jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim // 2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)

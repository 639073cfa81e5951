"""Rotary position embeddings (RoPE; Su et al. 2021), as LLaMA and GPT-NeoX apply them.

Each head's vector is split into two halves (x1, x2) and the pair (x1[i], x2[i]) is rotated by
the angle `position * theta ** (-2i / head_dim)`. A query at position m and a key at position n
then score `q . k` as a function of their contents and of `m - n` only, which is why no position
table is learned and why a KV cache can store keys already rotated.
"""
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0):
  """-> float32 [head_dim // 2]: the rotation speed of each pair."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, *, theta: float = 10000.0):
  """x: [batch, seq, heads, head_dim]; positions: int [batch, seq] -> x rotated, same dtype.

  The "rotate half" layout (pairs are (i, i + head_dim/2)), as Hugging Face's LLaMA; angles are
  computed in float32 from the integer positions, so position 4000 is as exact as position 4.
  """
  head_dim = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
  cos = jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim // 2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)

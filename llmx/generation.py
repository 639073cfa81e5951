"""Sampling from a causal language model: temperature, top-k, fixed seed."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_sampling_args(*, max_new_tokens: int, temperature: float, top_k: int | None):
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
  if top_k is not None and top_k < 0:
    raise ValueError(f"top_k={top_k}: must be >= 1, or 0/None for no top-k filter")


def sample_logits(key, logits, *, temperature: float, top_k: int | None):
  """logits: [batch, vocab] float32 -> token ids [batch]."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


def generate(model: nnx.Module, prompt: np.ndarray, *, max_new_tokens: int, block_size: int,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
  """Continues `prompt` (int [T0]) by `max_new_tokens` tokens; returns int [T0 + max_new_tokens].

  Each new token re-reads the last `block_size` tokens (no KV cache): one compiled loop, no
  recompilation per token. `model(tokens [1, T]) -> logits [1, T, vocab]`.
  """
  check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 1 or prompt.size == 0:
    raise ValueError(f"prompt: need a non-empty 1-D token array, got shape {prompt.shape}")
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, jnp.asarray(prompt), jax.random.key(seed), max_new_tokens,
                  block_size, float(temperature), top_k or None)
  return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt, key, max_new_tokens, block_size, temperature, top_k):
  model = nnx.merge(graphdef, state)
  n_prompt = prompt.shape[0]
  length = max(n_prompt + max_new_tokens, block_size)
  tokens = jnp.zeros((length,), jnp.int32).at[:n_prompt].set(prompt)

  def body(i, carry):
    tokens, key = carry
    position = n_prompt + i  # where the new token goes
    start = jnp.maximum(position - block_size, 0)
    window = jax.lax.dynamic_slice(tokens, (start,), (block_size,))
    logits = model(window[None])[0]
    # Causal attention: the zeros after `position` do not reach the logits before it.
    last = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, keepdims=False)
    key, sub = jax.random.split(key)
    token = sample_logits(sub, last[None].astype(jnp.float32), temperature=temperature, top_k=top_k)[0]
    return tokens.at[position].set(token.astype(jnp.int32)), key

  tokens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, key))
  return tokens[:n_prompt + max_new_tokens]

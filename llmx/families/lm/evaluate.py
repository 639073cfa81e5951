"""Perplexity and bits per character of a decoder LM on a text.

The text is cut into consecutive windows of block_size tokens (each window predicts its tokens
from the window's start, as in training); every token but the first is predicted once. Bits per
character = total nats / (ln 2 * characters of the text): unlike the loss per token it compares
models with different tokenizers.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.train.losses import IGNORE_INDEX


def windows(tokens: np.ndarray, block_size: int):
  """-> (inputs, targets) int32 [n, block_size]; targets IGNORE_INDEX past the end of the text."""
  n = max(math.ceil((len(tokens) - 1) / block_size), 1)
  padded = np.full(n * block_size + 1, IGNORE_INDEX, np.int32)
  padded[:len(tokens)] = tokens
  inputs = padded[:-1].reshape(n, block_size)
  return np.where(inputs < 0, 0, inputs), padded[1:].reshape(n, block_size)


def total_nats(model, tokens: np.ndarray, block_size: int, batch_size: int) -> tuple[float, int]:
  """-> (sum of next-token losses in nats, number of predicted tokens)."""
  inputs, targets = windows(tokens, block_size)
  graphdef, state = nnx.split(model)

  @jax.jit
  def batch_nats(state, inputs, targets):
    losses = nnx.merge(graphdef, state).token_losses(inputs, targets)
    return losses.astype(jnp.float32).sum()

  total = 0.0
  for start in range(0, len(inputs), batch_size):
    x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
    if len(x) < batch_size:  # one compiled shape: pad with rows that predict nothing
      pad = batch_size - len(x)
      x = np.concatenate([x, np.zeros((pad, block_size), np.int32)])
      y = np.concatenate([y, np.full((pad, block_size), IGNORE_INDEX, np.int32)])
    total += float(batch_nats(state, x, y))
  return total, int((targets >= 0).sum())


def perplexity(model, tokenizer, text: str, *, batch_size: int, window: int | None = None) -> dict:
  """-> {characters, tokens, block_size, loss (nats/token), perplexity, bits_per_token,
  bits_per_char} of `model` on `text`, in windows of `window` tokens (None: the model's context)."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1 (windows per pass)")
  if window is not None and (not isinstance(window, int) or window < 2):
    raise ValueError(f"window={window!r}: must be an integer >= 2 tokens, or None for the "
                     f"model's context")
  tokens = tokenizer.encode(text)
  block_size = min(window or model.config.block_size, model.config.block_size)
  nats, predicted = total_nats(model, tokens, block_size, batch_size)
  per_token = nats / predicted
  return dict(characters=len(text), tokens=len(tokens), block_size=block_size, loss=per_token,
              perplexity=math.exp(per_token), bits_per_token=per_token / math.log(2),
              bits_per_char=nats / (math.log(2) * len(text)))

r"""Perplexity and bits per character of the LM in a run folder on held-out text.

  python -m experiments.eval_lm --workdir=/tmp/llama_tiny --data=held_out.txt
  python -m experiments.eval_lm --workdir=/tmp/llama_tiny   # the run's own validation split

The text is tokenized with the run's tokenizer and cut into consecutive windows of block_size
tokens (each window predicts its tokens from the window's start, as in training); every token
but the first is predicted once. Bits per character = total nats / (ln 2 * characters of the
text): unlike the loss per token it compares models with different tokenizers.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from llmx.families.lm import recipe as lm_setup
from llmx.train.launch import run
from llmx.data import corpus

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.", required=True)
_DATA = flags.DEFINE_string("data", "", "UTF-8 text file to evaluate on; empty: the run's "
                            "validation split (data.path, data.val_fraction of its config).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Windows per forward pass.")


def windows(tokens: np.ndarray, block_size: int):
  """-> (inputs, targets) int32 [n, block_size]; targets -100 past the end of the text."""
  n = max(math.ceil((len(tokens) - 1) / block_size), 1)
  padded = np.full(n * block_size + 1, -100, np.int32)
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
      y = np.concatenate([y, np.full((pad, block_size), -100, np.int32)])
    total += float(batch_nats(state, x, y))
  return total, int((targets >= 0).sum())


def main(argv):
  del argv
  model, tokenizer, config, step = lm_setup.load_run(_WORKDIR.value)
  if _DATA.value:
    text, source = corpus.load_text(_DATA.value, field="--data"), _DATA.value
  else:
    text = lm_setup.validation_text(config)
    source = f"validation split of {config.data.path or '<embedded corpus>'}"
  tokens = tokenizer.encode(text)
  if len(tokens) < 2:
    raise corpus.DataError(f"--data={_DATA.value!r}: need at least 2 tokens, got {len(tokens)}")
  block_size = model.config.block_size
  nats, predicted = total_nats(model, tokens, block_size, _BATCH.value)
  per_token = nats / predicted
  print(f"checkpoint step {step}, {source}: {len(text):,} characters, {len(tokens):,} tokens "
        f"({len(text) / len(tokens):.2f} characters/token), windows of {block_size} tokens")
  print(f"loss:            {per_token:.4f} nats/token")
  print(f"perplexity:      {math.exp(per_token):.3f} per token")
  print(f"bits per token:  {per_token / math.log(2):.4f}")
  print(f"bits per char:   {nats / (math.log(2) * len(text)):.4f}")


if __name__ == "__main__":
  run(main)

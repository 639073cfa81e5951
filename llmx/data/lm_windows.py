"""Language-model batches: random windows of a token stream, as a grain MapDataset.

Window `i` starts at an offset drawn from a generator seeded by `(seed, i)`, so any batch
can be recomputed from its index alone: the pipeline is deterministic, shards by process
with a slice, and its iterator state is one integer that is checkpointed with the model.
"""
import grain
import numpy as np


class RandomWindows:
  """Random-access source: item i -> int32 [block_size + 1] (inputs and shifted targets)."""

  def __init__(self, tokens: np.ndarray, block_size: int, seed: int, length: int = 2**40):
    if len(tokens) < block_size + 1:
      raise ValueError(
          f"block_size={block_size} needs at least {block_size + 1} tokens, the split has {len(tokens)}")
    self._tokens = np.asarray(tokens, dtype=np.int32)
    self._block = block_size
    self._seed = seed
    self._length = length

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    rng = np.random.default_rng((self._seed, int(index)))
    start = rng.integers(0, len(self._tokens) - self._block)
    return self._tokens[start:start + self._block + 1]


def lm_batches(tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Item `step` is this process's rows of global batch `step`: int32 [b, block_size + 1].

  Process p holds rows [p*b, (p+1)*b) of each global batch (b = batch_size / process_count),
  so the global batch, and the run, are the same whatever the number of processes.
  """
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
  rows = batch_size // process_count
  windows = RandomWindows(tokens, block_size, seed)

  def rows_of_batch(step):
    first = int(step) * batch_size + process_index * rows
    return np.stack([windows[first + r] for r in range(rows)])

  return grain.MapDataset.range(2**40 // batch_size).map(rows_of_batch)


def fixed_batches(tokens: np.ndarray, *, block_size: int, batch_size: int, num_batches: int,
                  seed: int) -> list[np.ndarray]:
  """The same `num_batches` batches at every evaluation, so validation losses compare."""
  ds = lm_batches(tokens, block_size=block_size, batch_size=batch_size, seed=seed)
  return [ds[i] for i in range(num_batches)]

"""Documents packed into fixed-length rows with segment ids and positions, as a grain MapDataset.

Rows are `block_size + 1` tokens long (inputs and next-token targets, as lm_windows' windows).
Documents are laid into rows one after another in a seeded order; a document that does not fit
in what is left of a row starts the next one (the rest is padding, segment id 0), and a document
longer than a row is cut into row-length pieces that overlap by one token, so every token but a
document's first is predicted exactly once. In a row, the k-th piece has segment id k (1, 2, ...)
and positions 0, 1, ... from its own start, so with the segment ids given to attention
(`kernels.dot_product_attention(query_segment_ids=..., kv_segment_ids=...)`) no token sees
another document, and each document is computed as if it were alone.

A batch is one int32 array [rows, 3, block_size + 1]: channel 0 the tokens, 1 the segment ids,
2 the positions (one array, so the trainer places it like any token batch). `split_packed` turns
it into model inputs. The batch of step i is computed from i alone (the rows of an epoch are a
seeded permutation of the packed rows), so the pipeline shards by process with a slice and its
checkpointed state is one integer, as lm_windows.lm_batches'.
"""
import dataclasses
import functools

import grain
import numpy as np

TOKENS, SEGMENT_IDS, POSITIONS = 0, 1, 2
IGNORE = -100  # the target of a position that predicts nothing (document end, padding)


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """int32 [n_rows, 3, row_length]: tokens, segment ids (0 = padding), positions."""
  rows: np.ndarray

  def __len__(self):
    return len(self.rows)

  @property
  def fill(self) -> float:
    """Fraction of slots that hold a token (the rest is padding)."""
    return float((self.rows[:, SEGMENT_IDS] > 0).mean())


def pack_documents(documents, row_length: int, *, seed: int | None = 0) -> PackedRows:
  """documents: token arrays (documents of fewer than 2 tokens predict nothing and are dropped);
  seed: the order documents are laid in (None: as given)."""
  if row_length < 2:
    raise ValueError(f"row_length={row_length}: a row needs at least 2 tokens")
  documents = [np.asarray(d, np.int32) for d in documents if len(d) >= 2]
  if not documents:
    raise ValueError("pack_documents: no document has 2 or more tokens")
  order = (np.arange(len(documents)) if seed is None
           else np.random.default_rng(seed).permutation(len(documents)))
  pieces = []
  for i in order:
    doc = documents[i]
    # Pieces of at most row_length tokens, each starting on the last token of the one before.
    for start in range(0, max(len(doc) - 1, 1), row_length - 1):
      pieces.append(doc[start:start + row_length])
  rows, row, used = [], np.zeros((3, row_length), np.int32), 0
  segment = 0
  for piece in pieces:
    if used + len(piece) > row_length:
      rows.append(row)
      row, used, segment = np.zeros((3, row_length), np.int32), 0, 0
    segment += 1
    row[TOKENS, used:used + len(piece)] = piece
    row[SEGMENT_IDS, used:used + len(piece)] = segment
    row[POSITIONS, used:used + len(piece)] = np.arange(len(piece))
    used += len(piece)
  rows.append(row)
  return PackedRows(np.stack(rows))


def split_packed(batch):
  """[b, 3, block_size + 1] -> (inputs, targets, positions, segment_ids), each [b, block_size].

  A target is IGNORE where the next slot belongs to another piece or to padding. Works on numpy
  and jax arrays alike.
  """
  tokens, segments, positions = batch[:, TOKENS], batch[:, SEGMENT_IDS], batch[:, POSITIONS]
  same_piece = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
  targets = tokens[:, 1:] * same_piece + IGNORE * (1 - same_piece)
  return tokens[:, :-1], targets, positions[:, :-1], segments[:, :-1]


class _EpochPermutations:
  """Row order of each epoch: a permutation seeded by (seed, epoch), the last few cached (grain
  may read batches from several threads: lru_cache stays correct under that)."""

  def __init__(self, n: int, seed: int):
    self._n = n
    self._permutation = functools.lru_cache(maxsize=4)(
        lambda epoch: np.random.default_rng((seed, epoch)).permutation(n))

  def row(self, global_row: int) -> int:
    epoch, index = divmod(global_row, self._n)
    return int(self._permutation(epoch)[index])


def packed_batches(packed: PackedRows, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """Item `step` is this process's rows of global batch `step`: int32 [b, 3, row_length].

  Global batch i holds rows i * batch_size ... of an endless sequence of epochs, each a seeded
  permutation of `packed`; process p holds its rows [p*b, (p+1)*b), b = batch_size /
  process_count, so the run is the same whatever the number of processes.
  """
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
  rows = batch_size // process_count
  order = _EpochPermutations(len(packed), seed)

  def rows_of_batch(step):
    first = int(step) * batch_size + process_index * rows
    return packed.rows[[order.row(first + r) for r in range(rows)]]

  return grain.MapDataset.range(2**40 // batch_size).map(rows_of_batch)

"""BERT pretraining examples: sentence pairs for next sentence prediction (NSP) and masked tokens
for masked language modelling (MLM), as a grain MapDataset indexed by step.

A corpus is a sequence of sentences (here: its non-empty lines). Example `i` is drawn by a
generator seeded with `(seed, i)`, so any batch can be recomputed from its index alone (the
pipeline is deterministic, resumes from one integer and shards by process with a slice):
  * a run of consecutive sentences starting at a random one is cut at a random sentence boundary
    into A and B; with probability 1/2, B is instead the sentences starting at a random place
    elsewhere in the corpus (NSP label 1; 0 = B is A's continuation);
  * the pair is truncated to `max_len - 3` tokens by dropping tokens at A's front or B's end (the
    junction the NSP head looks at is kept), then laid out as [CLS] A [SEP] B [SEP];
  * 15% of the non-special tokens (at least one, at most `max_predictions`) are selected for MLM;
    a selected token becomes [MASK] with probability 0.8, a random non-special token with 0.1,
    and stays itself with 0.1 (Devlin et al. 2019, section 3.1).
"""
import grain
import numpy as np
from llmx_kernels.cross_entropy import IGNORE_INDEX



def corpus_sentences(text: str) -> list[str]:
  """The non-empty lines of a text, stripped."""
  return [line.strip() for line in text.splitlines() if line.strip()]


def mask_tokens(tokens: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, *,
                mask_id: int, random_ids: np.ndarray, mask_prob: float = 0.15,
                max_predictions: int):
  """The 80/10/10 rule.

  tokens: int [T]; candidates: bool [T], the positions that may be selected (not special, not
  padding); random_ids: the ids a "random" replacement draws from.
  -> (input ids [T], positions [max_predictions], labels [max_predictions]): positions are the
  selected indices in increasing order, then 0 with label IGNORE_INDEX for the unused slots.
  """
  where = np.flatnonzero(candidates)
  n = min(max_predictions, max(1, int(round(len(where) * mask_prob))), len(where))
  chosen = np.sort(rng.choice(where, size=n, replace=False))
  inputs = tokens.copy()
  draw = rng.random(n)
  replace_mask = draw < 0.8
  replace_random = (draw >= 0.8) & (draw < 0.9)
  inputs[chosen[replace_mask]] = mask_id
  inputs[chosen[replace_random]] = rng.choice(random_ids, size=int(replace_random.sum()))
  positions = np.zeros(max_predictions, np.int32)
  labels = np.full(max_predictions, IGNORE_INDEX, np.int32)
  positions[:n] = chosen
  labels[:n] = tokens[chosen]
  return inputs, positions, labels


class PretrainingExamples:
  """Random-access source: item i -> one example (a dict of numpy arrays, see `__getitem__`)."""

  def __init__(self, sentences: list[np.ndarray], *, max_len: int, seed: int, cls_id: int,
               sep_id: int, pad_id: int, mask_id: int, vocab_size: int, special_ids,
               mask_prob: float = 0.15, max_predictions: int | None = None,
               length: int = 2**40):
    sentences = [np.asarray(s, np.int32) for s in sentences if len(s)]
    if len(sentences) < 4:
      raise ValueError(f"need at least 4 non-empty sentences to make sentence pairs; got {len(sentences)}")
    if max_len < 8:
      raise ValueError(f"max_len={max_len} is too short for [CLS] A [SEP] B [SEP] pairs (>= 8)")
    self._tokens = np.concatenate(sentences)
    self._starts = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    self.num_sentences = len(sentences)
    self.max_len = max_len
    self.max_predictions = max_predictions or max(1, int(np.ceil(mask_prob * (max_len - 3))))
    self._seed, self._length = seed, length
    self._cls, self._sep, self._pad, self._mask = cls_id, sep_id, pad_id, mask_id
    self._mask_prob = mask_prob
    self._random_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids)).astype(np.int32)

  def __len__(self):
    return self._length

  def _sentence(self, j):
    return self._tokens[self._starts[j]:self._starts[j + 1]]

  def _run(self, first: int, budget: int, min_sentences: int = 1) -> list[np.ndarray]:
    """Consecutive sentences from `first` until they hold `budget` tokens (and at least
    `min_sentences`), stopping at the end of the corpus."""
    out, total, j = [], 0, first
    while j < self.num_sentences and (total < budget or len(out) < min_sentences):
      out.append(self._sentence(j))
      total += len(out[-1])
      j += 1
    return out

  def __getitem__(self, index):
    """-> dict: input_ids, token_type_ids, attention_mask: int32 [max_len];
    mlm_positions, mlm_labels: int32 [max_predictions]; nsp_label: int32 scalar (1 = random B)."""
    rng = np.random.default_rng((self._seed, int(index)))
    budget = self.max_len - 3
    is_random = rng.random() < 0.5
    first = int(rng.integers(0, self.num_sentences - 1))
    chunk = self._run(first, budget, min_sentences=2)
    if len(chunk) < 2:  # `first` is the corpus's last sentence
      first = self.num_sentences - 2
      chunk = self._run(first, budget, min_sentences=2)
    a_count = int(rng.integers(1, len(chunk)))
    a = np.concatenate(chunk[:a_count])
    if not is_random:
      b = np.concatenate(chunk[a_count:])
    else:
      true_next = first + a_count
      while True:  # any start but the true continuation's neighbourhood
        other = int(rng.integers(0, self.num_sentences))
        if abs(other - true_next) > 2:
          break
      b = np.concatenate(self._run(other, budget - len(a)))
    # Truncate, keeping the A|B junction: drop from A's front or B's end, the longer first.
    a_from, b_to = 0, len(b)
    while len(a) - a_from + b_to > budget:
      if len(a) - a_from > b_to:
        a_from += 1
      else:
        b_to -= 1
    a, b = a[a_from:], b[:b_to]
    n = len(a) + len(b) + 3
    tokens = np.full(self.max_len, self._pad, np.int32)
    tokens[:n] = np.concatenate([[self._cls], a, [self._sep], b, [self._sep]])
    token_type = np.zeros(self.max_len, np.int32)
    token_type[len(a) + 2:n] = 1
    attention_mask = (np.arange(self.max_len) < n).astype(np.int32)
    candidates = attention_mask.astype(bool)
    candidates[[0, len(a) + 1, n - 1]] = False
    inputs, positions, labels = mask_tokens(
        tokens, candidates, rng, mask_id=self._mask, random_ids=self._random_ids,
        mask_prob=self._mask_prob, max_predictions=self.max_predictions)
    return dict(input_ids=inputs, token_type_ids=token_type, attention_mask=attention_mask,
                mlm_positions=positions, mlm_labels=labels, nsp_label=np.int32(is_random))


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def pretraining_batches(examples: PretrainingExamples, *, batch_size: int, process_index: int = 0,
                        process_count: int = 1) -> grain.MapDataset:
  """Item `step` is this process's rows of global batch `step` (dict of arrays, leading dim
  batch_size / process_count); the global batch does not depend on the number of processes."""
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
  rows = batch_size // process_count

  def rows_of_batch(step):
    first = int(step) * batch_size + process_index * rows
    return stack([examples[first + r] for r in range(rows)])

  return grain.MapDataset.range(len(examples) // batch_size).map(rows_of_batch)


def fixed_batches(examples: PretrainingExamples, *, batch_size: int, num_batches: int) -> list[dict]:
  """The same batches at every evaluation, so validation metrics compare across steps."""
  ds = pretraining_batches(examples, batch_size=batch_size)
  return [ds[i] for i in range(num_batches)]


def unigram_baseline(examples_or_batches, train_tokens: np.ndarray) -> float:
  """MLM accuracy of always predicting the training split's most frequent token, measured on
  the selected positions of `batches` (a list of batch dicts)."""
  most_frequent = int(np.bincount(train_tokens).argmax())
  labels = np.concatenate([b["mlm_labels"].reshape(-1) for b in examples_or_batches])
  labels = labels[labels != IGNORE_INDEX]
  return float((labels == most_frequent).mean())

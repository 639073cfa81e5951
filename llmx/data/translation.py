"""Parallel text for translation: tab-separated pairs, a fixed-seed split, a shared subword
tokenizer and token-count batches as a grain MapDataset indexed by step.

The Tatoeba file (`eng-fra.txt`) has one pair per line, `english<TAB>french` (an optional third
field, the attribution of some Tatoeba exports, is ignored). A line with fewer than two fields or
an empty side is an error that names its line number.

Batches hold sequences of similar lengths: each pair falls in the smallest length bucket that
holds both its sides, and a bucket of length L holds `tokens_per_batch // L` rows, so every batch
carries about the same number of tokens and there are only as many shapes (compilations) as
buckets. Batch `step` is computed from the step alone (epoch `step // batches_per_epoch`, whose
order is a permutation seeded by (seed, epoch)), so a resumed run sees exactly the batches it
would have seen.
"""
import dataclasses
import pathlib

import grain
import numpy as np

from llmx.errors import LlmxError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order


class TranslationDataError(LlmxError, ValueError):
  pass


def parse_pairs(text: str, *, source: str = "text") -> list[tuple[str, str]]:
  """`english<TAB>french` lines -> [(english, french)]; blank lines are skipped.

  Raises TranslationDataError naming `source` and the 1-based line number of the first line
  without two non-empty tab-separated fields.
  """
  pairs = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 2:
      raise TranslationDataError(
          f"{source}, line {number}: expected 'source<TAB>target', found no tab in {line[:80]!r}")
    src, tgt = fields[0].strip(), fields[1].strip()
    if not src or not tgt:
      side = "source" if not src else "target"
      raise TranslationDataError(f"{source}, line {number}: empty {side} sentence in {line[:80]!r}")
    pairs.append((src, tgt))
  if not pairs:
    raise TranslationDataError(f"{source}: no sentence pairs")
  return pairs


def load_pairs(path: str) -> list[tuple[str, str]]:
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise TranslationDataError(f"data.path={path!r}: no such file (expected tab-separated "
                               f"sentence pairs such as $LLMX_DATA_DIR/eng-fra.txt)")
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise TranslationDataError(f"data.path={path!r}: not UTF-8 text ({e.reason} at byte "
                               f"{e.start})") from None
  return parse_pairs(text, source=f"data.path={path!r}")


@dataclasses.dataclass(frozen=True)
class Splits:
  train: list
  val: list
  test: list


def split_pairs(pairs: list, *, num_val: int, num_test: int, seed: int) -> Splits:
  """A fixed-seed permutation: the first num_test pairs test, the next num_val validate, the
  rest train. The same file and seed give the same split on every machine."""
  if num_val + num_test >= len(pairs):
    raise TranslationDataError(f"data.num_val={num_val} + data.num_test={num_test} leaves no "
                               f"training pairs out of {len(pairs)}")
  order = np.random.default_rng(seed).permutation(len(pairs))
  take = lambda idx: [pairs[i] for i in idx]
  return Splits(test=take(order[:num_test]), val=take(order[num_test:num_test + num_val]),
                train=take(order[num_test + num_val:]))


class SubwordTokenizer:
  """A BPE vocabulary shared by both languages (HF `tokenizers`), SentencePiece-style: spaces
  become '▁' on the words that follow them (Metaspace), so decoding restores the text exactly up
  to whitespace runs. Ids 0-3 are <pad>, <s>, </s>, <unk>."""

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    for i, token in enumerate(SPECIAL_TOKENS):
      if tokenizer.token_to_id(token) != i:
        raise TranslationDataError(f"tokenizer: {token!r} must have id {i}")

  @classmethod
  def train(cls, texts, vocab_size: int) -> "SubwordTokenizer":
    """Learns `vocab_size` entries from `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 64:
      raise TranslationDataError(f"data.vocab_size={vocab_size}: must be >= 64")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return cls(tokenizer)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    """Subword ids of `text`, without <s> or </s>."""
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of `ids`, stopping at the first </s>; <pad> and <s> are dropped."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        out.append(i)
    return self._tokenizer.decode(out, skip_special_tokens=False)

  def to_json(self) -> dict:
    return {"type": "subword_bpe", "tokenizer_json": self._tokenizer.to_str()}

  @classmethod
  def from_json(cls, data: dict) -> "SubwordTokenizer":
    from tokenizers import Tokenizer
    if data.get("type") != "subword_bpe":
      raise TranslationDataError(f"not a translation tokenizer: type={data.get('type')!r}")
    return cls(Tokenizer.from_str(data["tokenizer_json"]))


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
  """Token ids of pairs: src[i] ends with </s>; tgt[i] is <s> ... </s> (decoder input = tgt[:-1],
  labels = tgt[1:]). dropped: pairs left out because a side exceeded max_len."""
  src: list
  tgt: list
  dropped: int


def encode_pairs(tokenizer: SubwordTokenizer, pairs: list, *, max_len: int) -> EncodedPairs:
  """Keeps the pairs whose source (with </s>) and target (with <s>, </s>, minus one for the
  shift) fit in max_len tokens."""
  src_ids = tokenizer.encode_batch(p[0] for p in pairs)
  tgt_ids = tokenizer.encode_batch(p[1] for p in pairs)
  src, tgt = [], []
  for s, t in zip(src_ids, tgt_ids):
    if len(s) + 1 > max_len or len(t) + 1 > max_len or len(s) == 0 or len(t) == 0:
      continue
    src.append(np.concatenate([s, [tokenizer.eos_id]]).astype(np.int32))
    tgt.append(np.concatenate([[tokenizer.bos_id], t, [tokenizer.eos_id]]).astype(np.int32))
  return EncodedPairs(src=src, tgt=tgt, dropped=len(pairs) - len(src))


BUCKETS = (8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)


def bucket_lengths(max_len: int) -> tuple[int, ...]:
  """Batch lengths: steps of 4 where most Tatoeba sentences lie (less padding), coarser above
  (fewer shapes to compile), max_len last."""
  return tuple(b for b in BUCKETS if b < max_len) + (max_len,)


class TokenBatches:
  """Random-access token-count batches. Item i is a dict of int32 arrays:
  src [rows, L], tgt_in [rows, L] (decoder input), tgt_out [rows, L] (labels, -100 at padding),
  where L is the bucket length and rows = tokens_per_batch // L rounded down to a multiple of
  `row_multiple` (for the data-parallel split). Padding is id 0."""

  def __init__(self, data: EncodedPairs, *, tokens_per_batch: int, max_len: int, seed: int,
               row_multiple: int = 8, shuffle: bool = True):
    if not data.src:
      raise TranslationDataError("no training pairs fit in model.max_len tokens")
    self.buckets = bucket_lengths(max_len)
    self.rows = []
    for length in self.buckets:
      rows = tokens_per_batch // length // row_multiple * row_multiple
      if rows == 0:
        raise TranslationDataError(
            f"train.tokens_per_batch={tokens_per_batch} holds no {row_multiple} rows of "
            f"{length} tokens: use at least {row_multiple * max_len}")
      self.rows.append(rows)
    self._src, self._tgt = data.src, data.tgt
    lengths = np.array([max(len(s), len(t) - 1) for s, t in zip(data.src, data.tgt)])
    self._bucket_of = np.searchsorted(np.array(self.buckets), lengths)
    self._seed, self._shuffle = seed, shuffle
    self._per_bucket = [np.flatnonzero(self._bucket_of == b) for b in range(len(self.buckets))]
    self.batches_per_epoch = sum(-(-len(ix) // r) for ix, r in zip(self._per_bucket, self.rows))
    self._epoch, self._plan = None, None

  def _epoch_plan(self, epoch: int) -> list:
    """[(bucket, pair indices)] of every batch of this epoch, in training order."""
    rng = np.random.default_rng((self._seed, epoch))
    plan = []
    for b, (indices, rows) in enumerate(zip(self._per_bucket, self.rows)):
      if self._shuffle:
        indices = rng.permutation(indices)
      plan.extend((b, indices[i:i + rows]) for i in range(0, len(indices), rows))
    if self._shuffle:
      plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan

  def __len__(self):
    return self.batches_per_epoch

  def __getitem__(self, step: int) -> dict:
    epoch, index = divmod(int(step), self.batches_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._plan = epoch, self._epoch_plan(epoch)
    bucket, indices = self._plan[index]
    return self.pad(indices, self.buckets[bucket], self.rows[bucket])

  def pad(self, indices, length: int, rows: int) -> dict:
    src = np.zeros((rows, length), np.int32)
    tgt_in = np.zeros((rows, length), np.int32)
    tgt_out = np.full((rows, length), -100, np.int32)
    for r, i in enumerate(indices):
      s, t = self._src[i], self._tgt[i]
      src[r, :len(s)] = s
      tgt_in[r, :len(t) - 1] = t[:-1]
      tgt_out[r, :len(t) - 1] = t[1:]
    return dict(src=src, tgt_in=tgt_in, tgt_out=tgt_out)


def train_batches(batches: TokenBatches, *, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Item `step`: this process's rows of global batch `step` (endless; epochs follow each other)."""
  def rows_of(step):
    batch = batches[step]
    rows = batch["src"].shape[0] // process_count
    return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
  return grain.MapDataset.range(2**40).map(rows_of)


def eval_batches(data: EncodedPairs, *, tokens_per_batch: int, max_len: int,
                 num_batches: int) -> list[dict]:
  """The first `num_batches` batches of the pairs in a fixed (unshuffled) order."""
  batches = TokenBatches(data, tokens_per_batch=tokens_per_batch, max_len=max_len, seed=0,
                         shuffle=False)
  return [batches[i] for i in range(min(num_batches, len(batches)))]

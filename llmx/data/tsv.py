"""Fine-tuning task files, their features and batches.

Formats (UTF-8; a malformed row is a DataError naming the file and its line number):
  * classification: TSV with a header row holding a `sentence` column and a `label` column (and
    optionally `sentence2` for pairs), one example per row, fields separated by one tab, no
    quoting: GLUE's SST-2 `train.tsv` / `dev.tsv` as distributed. Labels are strings; the label
    set is the sorted set of the training file's labels.
  * tagging (token classification): TSV with a header row `tokens<TAB>tags`; each row holds the
    words separated by single spaces and as many space-separated tags, e.g.
    `John lives in Paris<TAB>B-PER O O B-LOC`. Each word's first sub-token carries its tag.
  * qa (extractive): JSON Lines, one object per line with `question`, `context`, `answer_text`
    and `answer_start` (the answer's character offset in `context`), as SQuAD v1.1 flattened.
"""
import functools
import json
import pathlib

import grain
import numpy as np

from llmx.data.corpus import DataError
from llmx_kernels.cross_entropy import IGNORE_INDEX



def _lines(path, field: str):
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise DataError(f"{field}={str(path)!r}: no such file")
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{field}={str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  return p, text.splitlines()


def read_tsv(path, required: tuple[str, ...], optional: tuple[str, ...] = (), *,
             field: str = "data.path") -> list[dict]:
  """Rows of a TSV file with a header, as dicts of the required and present optional columns.
  Each row must have as many fields as the header; the error names the line number (1-based,
  header = line 1)."""
  p, lines = _lines(path, field)
  if not lines:
    raise DataError(f"{p}: empty file; expected a header row with columns {', '.join(required)}")
  header = lines[0].split("\t")
  absent = [c for c in required if c not in header]
  if absent:
    raise DataError(f"{p}:1: header {header} lacks column(s) {absent}; expected "
                    f"{'<TAB>'.join(required)}")
  wanted = [c for c in (*required, *optional) if c in header]
  index = {c: header.index(c) for c in wanted}
  rows = []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      raise DataError(f"{p}:{number}: malformed row: {len(fields)} tab-separated field(s), the "
                      f"header has {len(header)} ({'<TAB>'.join(header)}): {line[:80]!r}")
    row = {c: fields[i] for c, i in index.items()}
    row["line"] = number
    rows.append(row)
  if not rows:
    raise DataError(f"{p}: no rows after the header")
  return rows


def read_classification(path, *, field: str = "data.path") -> list[dict]:
  """-> [{sentence, label, line} (+ sentence2)]; an empty sentence or label is malformed."""
  rows = read_tsv(path, ("sentence", "label"), ("sentence2",), field=field)
  for r in rows:
    if not r["sentence"].strip() or not r["label"].strip():
      raise DataError(f"{path}:{r['line']}: malformed row: empty sentence or label")
    r["label"] = r["label"].strip()
  return rows


def read_tagging(path, *, field: str = "data.path") -> list[dict]:
  """-> [{words: list, tags: list, line}]; the word and tag counts of a row must agree."""
  rows = read_tsv(path, ("tokens", "tags"), field=field)
  out = []
  for r in rows:
    words, tags = r["tokens"].split(), r["tags"].split()
    if not words or len(words) != len(tags):
      raise DataError(f"{path}:{r['line']}: malformed row: {len(words)} word(s) but {len(tags)} "
                      f"tag(s); each space-separated word needs one tag")
    out.append(dict(words=words, tags=tags, line=r["line"]))
  return out


def read_qa(path, *, field: str = "data.path") -> list[dict]:
  """-> [{question, context, answer_text, answer_start, line}]; the answer must be the context's
  text at answer_start."""
  p, lines = _lines(path, field)
  out = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{p}:{number}: malformed row: not JSON ({e.msg} at column {e.colno})") from None
    keys = ("question", "context", "answer_text", "answer_start")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
      raise DataError(f"{p}:{number}: malformed row: needs the keys {', '.join(keys)}")
    start, text = obj["answer_start"], obj["answer_text"]
    if (not isinstance(start, int) or not isinstance(text, str) or not text
        or obj["context"][start:start + len(text)] != text):
      raise DataError(f"{p}:{number}: malformed row: answer_text {text!r} is not at "
                      f"answer_start={start!r} of the context")
    out.append(dict(question=obj["question"], context=obj["context"], answer_text=text,
                    answer_start=start, line=number))
  if not out:
    raise DataError(f"{p}: no examples")
  return out


def label_ids(values, labels: list[str], path, lines) -> np.ndarray:
  index = {l: i for i, l in enumerate(labels)}
  out = []
  for v, line in zip(values, lines):
    if v not in index:
      raise DataError(f"{path}:{line}: label {v!r} does not occur in the training file "
                      f"(labels: {', '.join(labels)})")
    out.append(index[v])
  return np.asarray(out, np.int32)


# --- features: a list of per-example dicts of variable-length arrays ---------------------------

def _example_dicts(encodings, **per_example) -> list[dict]:
  out = []
  for i, e in enumerate(encodings):
    ex = dict(input_ids=np.asarray(e.ids, np.int32), token_type_ids=np.asarray(e.type_ids, np.int32))
    ex.update({k: v[i] for k, v in per_example.items()})
    out.append(ex)
  return out


def classification_features(rows, tokenizer, labels, *, max_length: int, path="") -> list[dict]:
  pairs = [r["sentence2"] for r in rows] if rows and "sentence2" in rows[0] else None
  enc = tokenizer.encodings([r["sentence"] for r in rows], pairs, max_length=max_length)
  y = label_ids([r["label"] for r in rows], labels, path, [r["line"] for r in rows])
  return _example_dicts(enc, labels=y)


def tagging_features(rows, tokenizer, tags, *, max_length: int, path="") -> list[dict]:
  """Each word's first sub-token is labelled with the word's tag; other positions IGNORE_INDEX."""
  enc = tokenizer.encodings([r["words"] for r in rows], max_length=max_length, is_pretokenized=True)
  out = []
  for e, r in zip(enc, rows):
    y = label_ids(r["tags"], tags, path, [r["line"]] * len(r["tags"]))
    labels = np.full(len(e.ids), IGNORE_INDEX, np.int32)
    previous = None
    for t, w in enumerate(e.word_ids):
      if w is not None and w != previous:
        labels[t] = y[w]
      previous = w
    out.append(dict(input_ids=np.asarray(e.ids, np.int32),
                    token_type_ids=np.asarray(e.type_ids, np.int32), labels=labels))
  return out


def qa_features(rows, tokenizer, *, max_length: int) -> list[dict]:
  """[CLS] question [SEP] context [SEP], the context truncated to fit. start/end_positions: the
  first and last context tokens overlapping the answer's characters, or 0 ([CLS]) when the
  answer was truncated away. `offsets` [T, 2] map tokens back to context characters."""
  enc = tokenizer.encodings([r["question"] for r in rows], [r["context"] for r in rows],
                            max_length=max_length, truncation="only_second")
  out = []
  for e, r in zip(enc, rows):
    lo, hi = r["answer_start"], r["answer_start"] + len(r["answer_text"])
    in_context = np.array([s == 1 for s in e.sequence_ids], bool)
    offsets = np.asarray(e.offsets, np.int32).reshape(-1, 2)
    overlap = in_context & (offsets[:, 0] < hi) & (offsets[:, 1] > lo)
    hits = np.flatnonzero(overlap)
    start, end = (int(hits[0]), int(hits[-1])) if len(hits) else (0, 0)
    out.append(dict(input_ids=np.asarray(e.ids, np.int32),
                    token_type_ids=np.asarray(e.type_ids, np.int32),
                    start_positions=np.int32(start), end_positions=np.int32(end),
                    offsets=np.where(in_context[:, None], offsets, -1)))
  return out


def collate(examples: list[dict], *, pad_id: int, length: int) -> dict:
  """Pads the variable-length fields to `length`: input_ids with pad_id, labels with
  IGNORE_INDEX, the rest with 0; adds attention_mask (1 real, 0 padding)."""
  n = len(examples)
  out = dict(input_ids=np.full((n, length), pad_id, np.int32),
             token_type_ids=np.zeros((n, length), np.int32),
             attention_mask=np.zeros((n, length), np.int32))
  for i, ex in enumerate(examples):
    k = len(ex["input_ids"])
    out["input_ids"][i, :k] = ex["input_ids"]
    out["token_type_ids"][i, :k] = ex["token_type_ids"]
    out["attention_mask"][i, :k] = 1
  for key in examples[0]:
    if key in out or key == "offsets":
      continue
    values = [ex[key] for ex in examples]
    if np.ndim(values[0]) == 0:
      out[key] = np.asarray(values, np.int32)
    else:  # per-token labels
      out[key] = np.full((n, length), IGNORE_INDEX, np.int32)
      for i, v in enumerate(values):
        out[key][i, :len(v)] = v
  return out


def _bucket(longest: int, multiple: int, max_length: int) -> int:
  # Batches are padded to a multiple of `multiple`: a few shapes (each compiled once) instead of
  # one per length, and far less padding than always using max_length.
  return min(max_length, -(-longest // multiple) * multiple)


def task_batches(examples: list[dict], *, batch_size: int, seed: int, pad_id: int, max_length: int,
                 pad_multiple: int = 16, group_by_length: int = 0, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Item `step` -> this process's rows of global batch `step`: epochs of a fresh permutation
  seeded by (seed, epoch), padded to the global batch's longest row rounded up to pad_multiple.

  group_by_length=k > 0: each epoch's permutation is cut into chunks of k batches; a chunk is
  sorted by length, cut into batches, and its batches are served in a random order. Rows of
  similar length share a batch, so there is less padding to compute on (SST-2's training
  phrases, median 10 tokens: about half the compute of random batches). An epoch is then
  len(examples) // batch_size batches; the few rows left over differ from epoch to epoch."""
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
  rows = batch_size // process_count
  n = len(examples)
  if group_by_length and n < batch_size:
    raise ValueError(f"{n} examples cannot fill one batch of {batch_size} rows")

  @functools.lru_cache(maxsize=2)
  def permutation(epoch):
    return np.random.default_rng((seed, epoch)).permutation(n)

  lengths = np.array([len(e["input_ids"]) for e in examples])
  per_epoch = n // batch_size

  @functools.lru_cache(maxsize=2)
  def sorted_chunk(epoch, chunk):
    # -> [batches in chunk, batch_size] example indices; a stable sort keeps the random order
    # among rows of equal length.
    ids = permutation(epoch)[chunk * group_by_length * batch_size:][:group_by_length * batch_size]
    ids = ids[:len(ids) // batch_size * batch_size]
    ids = ids[np.argsort(lengths[ids], kind="stable")].reshape(-1, batch_size)
    return ids[np.random.default_rng((seed, epoch, chunk)).permutation(len(ids))]

  def global_ids(step):
    if group_by_length:
      epoch, within = divmod(int(step), per_epoch)
      chunk, j = divmod(within, group_by_length)
      return [int(i) for i in sorted_chunk(epoch, chunk)[j]]
    return [int(permutation(g // n)[g % n]) for g in range(int(step) * batch_size, (int(step) + 1) * batch_size)]

  def batch_of_step(step):
    ids = global_ids(step)
    length = _bucket(max(len(examples[i]["input_ids"]) for i in ids), pad_multiple, max_length)
    mine = ids[process_index * rows:(process_index + 1) * rows]
    return collate([examples[i] for i in mine], pad_id=pad_id, length=length)

  return grain.MapDataset.range(2**40 // batch_size).map(batch_of_step)


def eval_batches(examples: list[dict], *, batch_size: int, pad_id: int, max_length: int,
                 pad_multiple: int = 16) -> list[dict]:
  """Every example once, in order; the last batch is short (not padded with fake rows)."""
  out = []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    length = _bucket(max(len(e["input_ids"]) for e in chunk), pad_multiple, max_length)
    out.append(collate(chunk, pad_id=pad_id, length=length))
  return out

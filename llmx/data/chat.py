"""Supervised fine-tuning data: chat conversations, their loss masks, and packed or padded batches.

Format (JSON Lines, UTF-8): one conversation per line,
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
with at least one assistant message; other keys are ignored, blank lines skipped. A malformed line
is a DataError naming the file, the line number and the problem.

A conversation is rendered with the tokenizer's own chat template and trained on its assistant
messages only: their content and end-of-turn text (`<|im_end|>` for SmolLM2), not the role
headers, not the system or user text. A conversation of n tokens gives n - 1 (input, target)
pairs; the target of a pair is IGNORE_INDEX where the predicted token is not an assistant token.

Rows are int32 [n_rows, 4, seq_len]: channel 0 the inputs, 1 the segment ids (0 = padding, k = the
row's k-th conversation), 2 the positions (0, 1, ... from each conversation's start), 3 the
targets (same channel order as llmx.data.packing, which serves them in seeded epochs). A batch is
a dict of int32 [batch, seq_len] arrays: inputs, targets, positions, segment_ids. Targets never
cross a conversation boundary (each conversation's pairs are laid whole), so attention given the
segment ids computes each conversation as if it were alone.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib

import grain
import numpy as np

from llmx.data import packing
from llmx.data.corpus import DataError
from llmx.errors import LlmxError
from llmx.formats import chat_template
from llmx_kernels.cross_entropy import IGNORE_INDEX

INPUTS, SEGMENT_IDS, POSITIONS, TARGETS = 0, 1, 2, 3


# ------------------------------------------------------------------------------- reading JSONL

def check_conversation(messages, where: str = "conversation") -> list[dict]:
  """-> [{"role", "content"}]; a DataError starting with `where` says what is wrong."""
  try:
    out = chat_template.check_messages(messages, where)
  except chat_template.ChatTemplateError as e:
    raise DataError(str(e)) from None
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: no assistant message (nothing to train on)")
  return out


def read_chat_jsonl(path) -> list[list[dict]]:
  """The conversations of a JSON Lines file (format above), in file order."""
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise DataError(f"{path}: no such file")
  conversations = []
  with p.open(encoding="utf-8", errors="strict") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{p}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: expected an object with a 'messages' list, got {_short(record)}")
      conversations.append(check_conversation(record["messages"], where))
  if not conversations:
    raise DataError(f"{p}: no conversation (empty file)")
  return conversations


def write_jsonl(conversations, path) -> pathlib.Path:
  """Writes conversations ([{"role", "content"}] lists) in the format read_chat_jsonl reads."""
  p = pathlib.Path(path).expanduser()
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("w", encoding="utf-8") as f:
    for messages in conversations:
      f.write(json.dumps({"messages": check_conversation(messages)}, ensure_ascii=False) + "\n")
  return p


def _short(x, n: int = 60) -> str:
  text = repr(x)
  return text if len(text) <= n else text[:n] + "..."


# ------------------------------------------------------------------------------- loss masks

def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
  """-> (the rendered conversation, the [start, end) character span of each assistant message).

  Generic for any template: the text before an assistant message is the rendering of the
  messages before it with the generation prompt; the text through it is the rendering up to it.
  The span between is the message as the template writes it with its end-of-turn text; trailing
  whitespace (the template's line break between turns) is left out, since generation stops at
  the end-of-turn token and never produces it."""
  messages = check_conversation(messages)
  full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    if i == 0:
      raise DataError("an assistant message comes first: there is no prompt before it")
    before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
    through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False,
                                            tokenize=False)
    if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
      # E.g. templates that rewrite earlier turns (reasoning dropped from past assistant turns).
      raise DataError(f"the chat template does not render messages[:{i}] as a prefix of the whole "
                      f"conversation; assistant tokens cannot be located")
    spans.append((len(before), max(len(before), len(through.rstrip()))))
  return full, spans


def tokenize_conversation(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
  """-> (ids int32 [n], loss_mask bool [n]): the conversation as the chat template renders it,
  tokenized once (ids == tokenizer.encode(text)); loss_mask is True on the tokens of assistant
  spans (see assistant_spans). A token that straddles a span's edge counts as assistant: it
  carries assistant text the model must produce.

  tokenizer: has apply_chat_template(messages, add_generation_prompt=, tokenize=) and encode(text);
  token offsets come from `tokenizer.tokenizer` (a `tokenizers.Tokenizer`) when it has one.
  Otherwise the pieces between span edges are encoded apart, and must concatenate to
  encode(text) (a DataError if not)."""
  text, spans = assistant_spans(tokenizer, messages)
  inner = getattr(tokenizer, "tokenizer", None)
  if inner is not None and hasattr(inner, "encode"):
    encoding = inner.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
      mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return ids, mask
  edges = [0, *[e for span in spans for e in span], len(text)]
  pieces = [np.asarray(tokenizer.encode(text[a:b]), np.int32) for a, b in zip(edges, edges[1:])]
  ids = np.concatenate(pieces)
  if not np.array_equal(ids, np.asarray(tokenizer.encode(text), np.int32)):
    raise DataError("the assistant spans do not fall on token boundaries, and this tokenizer "
                    "gives no offsets (tokenizer.tokenizer)")
  mask = np.concatenate([np.full(len(p), k % 2 == 1) for k, p in enumerate(pieces)])
  return ids, mask


def tokenize_conversations(tokenizer, conversations) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(ids int32 [n], loss_mask bool [n])] of each conversation; an error names its index."""
  out = []
  for k, messages in enumerate(conversations):
    try:
      out.append(tokenize_conversation(tokenizer, messages))
    except LlmxError as e:  # the template's own errors too (e.g. roles out of order)
      raise DataError(f"conversation {k}: {e}") from None
  return out


# ------------------------------------------------------------------------------- rows

@dataclasses.dataclass(frozen=True)
class ChatRows:
  """rows: int32 [n_rows, 4, seq_len] (channels INPUTS, SEGMENT_IDS, POSITIONS, TARGETS).
  conversations: how many are in the rows; truncated: how many of those were cut to fit a row;
  dropped: how many were left out (too long with truncate=False, or nothing to predict);
  pad_id: the input of padding slots."""
  rows: np.ndarray
  conversations: int
  truncated: int
  dropped: int
  pad_id: int = 0

  def __len__(self):
    return len(self.rows)

  @property
  def fill(self) -> float:
    """Fraction of slots that hold a conversation's token (the rest is padding)."""
    return float((self.rows[:, SEGMENT_IDS] > 0).mean())

  @property
  def loss_tokens(self) -> int:
    return int((self.rows[:, TARGETS] != IGNORE_INDEX).sum())


def _pairs(ids, mask, seq_len: int, truncate: bool):
  """-> (inputs [m], targets [m], truncated) with m <= seq_len, or None to drop."""
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
  trained = np.flatnonzero(mask[1:])
  if not len(trained):
    return None
  # Tokens after the last trained one predict nothing and no later target sees them.
  n = int(trained[-1]) + 2
  truncated = n - 1 > seq_len
  if truncated:
    if not truncate:
      return None
    n = seq_len + 1
    if not mask[1:n].any():  # every trained token was past the cut
      return None
  targets = np.where(mask[1:n], ids[1:n], IGNORE_INDEX).astype(np.int32)
  return ids[:n - 1], targets, truncated


def chat_rows(examples, seq_len: int, *, pack: bool = True, truncate: bool = True,
              seed: int | None = 0, pad_id: int = 0) -> ChatRows:
  """examples: [(ids [n], loss_mask [n])] (tokenize_conversations) -> ChatRows of seq_len slots.

  A conversation of n tokens fills n - 1 slots (its trailing untrained tokens are left out). One
  longer than seq_len + 1 tokens is cut to its first seq_len + 1 (truncate=True; dropped when no
  trained token is left) or dropped (truncate=False); ChatRows counts both.
  pack=True: conversations, in an order seeded by `seed` (None: as given), go to the first row
  with room (first fit), so rows stay nearly full; pack=False: one conversation per row.
  Padding slots: input pad_id, segment id 0, position 0, target IGNORE_INDEX."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: a row needs at least 1 slot")
  laid, truncated, dropped = [], 0, 0
  order = (range(len(examples)) if seed is None
           else np.random.default_rng(seed).permutation(len(examples)))
  for k in order:
    pairs = _pairs(*examples[k], seq_len, truncate)
    if pairs is None:
      dropped += 1
      continue
    laid.append(pairs[:2])
    truncated += pairs[2]
  if not laid:
    raise DataError(f"no conversation has a trained token within seq_len={seq_len}")
  free = np.zeros(len(laid), np.int64)  # free slots per row; at most one row per conversation
  row_of, n_rows = [], 0
  for inputs, _ in laid:
    fits = np.flatnonzero(free[:n_rows] >= len(inputs)) if pack else ()
    r = int(fits[0]) if len(fits) else n_rows
    if r == n_rows:
      n_rows, free[r] = n_rows + 1, seq_len
    free[r] -= len(inputs)
    row_of.append(r)
  rows = np.zeros((n_rows, 4, seq_len), np.int32)
  rows[:, INPUTS], rows[:, TARGETS] = pad_id, IGNORE_INDEX
  used, segments = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int32)
  for (inputs, targets), r in zip(laid, row_of):
    a, b = used[r], used[r] + len(inputs)
    segments[r] += 1
    rows[r, INPUTS, a:b], rows[r, TARGETS, a:b] = inputs, targets
    rows[r, SEGMENT_IDS, a:b], rows[r, POSITIONS, a:b] = segments[r], np.arange(b - a)
    used[r] = b
  return ChatRows(rows, len(laid), truncated, dropped, pad_id)


def rows_to_batch(rows) -> dict:
  """int32 [b, 4, seq_len] -> {"inputs", "targets", "positions", "segment_ids"}: int32 [b, seq_len]."""
  return {"inputs": rows[:, INPUTS], "targets": rows[:, TARGETS],
          "positions": rows[:, POSITIONS], "segment_ids": rows[:, SEGMENT_IDS]}


def chat_batches(rows: ChatRows, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Item `step`: this process's rows of global batch `step` as a rows_to_batch dict of int32
  [batch_size / process_count, seq_len]. Global batch i holds rows i * batch_size ... of endless
  epochs, each a permutation of the rows seeded by (seed, epoch) (llmx.data.packing's
  packed_batches); process p takes rows [p*b, (p+1)*b) of it, so the run does not depend on the
  number of processes, and batch i is computed from (seed, i) alone."""
  ds = packing.packed_batches(packing.PackedRows(rows.rows), batch_size=batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)
  return ds.map(rows_to_batch)


def eval_chat_batches(rows: ChatRows, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """Every row once, in order, as ceil(n_rows / batch_size) rows_to_batch dicts of this
  process's int32 [batch_size / process_count, seq_len]. The last batch is filled with padding
  rows (no target), so every batch has one shape (one compilation) and splits by process."""
  if batch_size % process_count:
    raise ValueError(f"eval batch_size={batch_size} is not divisible by {process_count} processes")
  n, seq_len = len(rows.rows), rows.rows.shape[-1]
  padded = np.zeros((-(-n // batch_size) * batch_size, 4, seq_len), np.int32)
  padded[:, INPUTS], padded[:, TARGETS] = rows.pad_id, IGNORE_INDEX
  padded[:n] = rows.rows
  per = batch_size // process_count
  return [rows_to_batch(padded[i + process_index * per:i + (process_index + 1) * per])
          for i in range(0, len(padded), batch_size)]


# ------------------------------------------------------------------------------- chitchat

def chitchat_conversations(path=None, *, max_turns: int | None = None) -> list[list[dict]]:
  """The Chit Chat Challenge conversations (PyPI `chitchat-dataset`'s dataset.json; path None:
  the installed package's file, found without importing the package), ordered by conversation id.

  Each turn (consecutive messages of one sender) becomes one message, its texts stripped and
  joined with "\\n"; empty texts are left out, and turns left empty vanish (the same sender's
  turns around one are merged). The first sender is "user", the other "assistant". A trailing
  user turn is dropped (no reply to learn), and so is a conversation left with fewer than 2
  turns (of 7,168 in 0.9.0, 3,150 have one turn): 4,017 conversations are left.
  max_turns (even): a longer conversation is cut into pieces of at most max_turns turns, each
  starting with a user turn (long chats then fit a row instead of being truncated, and locating
  assistant tokens, which renders every prefix, costs less)."""
  if max_turns is not None and (max_turns < 2 or max_turns % 2):
    raise ValueError(f"max_turns={max_turns}: must be an even number >= 2 (user, assistant pairs)")
  if path is None:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
      raise DataError("the chitchat data needs the package: pip install chitchat-dataset==0.9.0")
    path = os.path.join(spec.submodule_search_locations[0], "dataset.json")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a readable chitchat dataset.json ({e})") from None
  conversations = []
  for key in sorted(data):
    turns = []  # [sender, [texts]]
    for turn in data[key].get("messages", []):
      for m in turn:
        text = str(m.get("text", "")).strip()
        if not text:
          continue
        if turns and turns[-1][0] == m.get("sender"):
          turns[-1][1].append(text)
        else:
          turns.append([m.get("sender"), [text]])
    if turns and len(turns) % 2:
      turns.pop()  # a user turn last: no assistant reply follows
    if len(turns) < 2:
      continue
    step = max_turns or len(turns)
    for first in range(0, len(turns), step):
      conversations.append([{"role": ("user", "assistant")[i % 2], "content": "\n".join(texts)}
                            for i, (_, texts) in enumerate(turns[first:first + step])])
  return conversations


def split_held_out(conversations, n_held_out: int, *, seed: int = 0) -> tuple[list, list]:
  """-> (train, held_out): held_out is the last n_held_out of a permutation seeded by `seed`;
  both keep the given order, so a fixed (data, seed) gives the same split every time."""
  n = len(conversations)
  if not 0 <= n_held_out < n:
    raise ValueError(f"n_held_out={n_held_out}: must be in [0, {n}) for {n} conversations")
  held = np.zeros(n, bool)
  held[np.random.default_rng(seed).permutation(n)[n - n_held_out:]] = True
  return ([c for c, h in zip(conversations, held) if not h],
          [c for c, h in zip(conversations, held) if h])

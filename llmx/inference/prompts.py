"""Lists of token ids -> padded batches: decoder prompts (right-padded, with their lengths) and
encoder sources (right-padded with the pad id, optionally truncated)."""
import numpy as np

from llmx.errors import LlmxError


class DecodingError(LlmxError, ValueError):
  """Bad decoding input or options: the message names the argument, its value and what is valid."""


def prompt_list(prompts) -> tuple[list, bool]:
  """One prompt (a 1-D array or a list of ids) or several -> (list of 1-D arrays, whether a
  single prompt was given)."""
  if hasattr(prompts, "ndim"):  # one numpy/jax array: 1-D is one prompt, 2-D a batch of rows
    prompts = np.asarray(prompts)
    return ([prompts], True) if prompts.ndim <= 1 else (list(prompts), False)
  prompts = list(prompts)
  if prompts and all(np.ndim(p) == 0 for p in prompts):  # a list of ids
    return [np.asarray(prompts)], True
  return [np.asarray(p) for p in prompts], False


def pad_prompts(prompts, context: int, vocab_size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts (see prompt_list) -> (int32 [rows, P] right-padded with 0, lengths int32 [rows]).
  vocab_size: token ids must lie in [0, vocab_size) (an id outside would read past the embedding
  table: NaN or zero logits, silently)."""
  prompts, _ = prompt_list(prompts)
  if not prompts:
    raise DecodingError("prompts: need at least one prompt")
  for i, p in enumerate(prompts):
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
      raise DecodingError(f"prompt {i}: need a non-empty 1-D array of token ids, got shape "
                          f"{p.shape} dtype {p.dtype}")
    if vocab_size is not None and (p.min() < 0 or p.max() >= vocab_size):
      bad = int(p[(p < 0) | (p >= vocab_size)][0])
      raise DecodingError(f"prompt {i} holds token id {bad}, outside the model's vocabulary "
                          f"[0, {vocab_size})")
    if p.size > context:
      raise DecodingError(f"prompt {i} has {p.size} tokens, longer than the model's context of "
                          f"{context} tokens: shorten the prompt")
  lengths = np.array([p.size for p in prompts], np.int32)
  batch = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :p.size] = p
  return batch, lengths


def pad_sources(sources, *, max_len: int, pad_id: int, eos_id: int | None = None,
                truncate: bool = False, multiple: int = 8) -> tuple[np.ndarray, int]:
  """Token-id sources (each ending in </s>) -> (int32 [rows, S] right-padded with pad_id,
  number truncated). S is the longest source rounded up to `multiple` (fewer compilations).

  An empty source raises DecodingError. A source longer than max_len raises DecodingError,
  unless truncate=True: then its first max_len - 1 tokens are kept, followed by </s> (eos_id).
  """
  if len(sources) == 0:
    raise DecodingError("no sources to decode")
  rows, truncated = [], 0
  for i, s in enumerate(sources):
    s = np.asarray(s)
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
      raise DecodingError(f"source {i}: need a 1-D array of token ids, got shape {s.shape} "
                          f"dtype {s.dtype}")
    if s.size == 0 or (eos_id is not None and s.size == 1 and s[0] == eos_id):
      raise DecodingError(f"source {i} is empty: give at least one token")
    if s.size > max_len:
      if not truncate:
        raise DecodingError(f"source {i} has {s.size} tokens, more than the model's max_len="
                            f"{max_len}: shorten it (or truncate=True keeps its first "
                            f"{max_len} tokens)")
      s = s[:max_len]
      if eos_id is not None:
        s = np.concatenate([s[:-1], [eos_id]])
      truncated += 1
    rows.append(s)
  width = min(-(-max(r.size for r in rows) // multiple) * multiple, max_len)
  batch = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    batch[i, :r.size] = r
  return batch, truncated

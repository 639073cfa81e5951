"""Character-level tokenizer built from the training text."""
import json

import numpy as np

from llmx.data.corpus import DataError


class CharTokenizer:
  """Maps each distinct character of a text to an id, in sorted order (as nanoGPT's char model)."""

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer: the vocabulary has repeated characters")
    self.chars = chars
    self._ids = {c: i for i, c in enumerate(chars)}

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
    except KeyError as e:
      raise DataError(
          f"character {e.args[0]!r} (U+{ord(e.args[0]):04X}) is not in the tokenizer's "
          f"vocabulary of {self.vocab_size} characters seen in training") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def to_json(self) -> dict:
    return {"type": "char", "chars": self.chars}

  @classmethod
  def from_json(cls, data: dict) -> "CharTokenizer":
    if data.get("type") != "char":
      raise ValueError(f"not a char tokenizer: type={data.get('type')!r}")
    return cls(data["chars"])

  def __eq__(self, other):
    return isinstance(other, CharTokenizer) and self.chars == other.chars

  def __repr__(self):
    return f"CharTokenizer(vocab_size={self.vocab_size}, chars={json.dumps(self.chars[:20])}...)"

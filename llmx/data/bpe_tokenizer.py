"""Byte-level BPE tokenizer (GPT-2's scheme) on Hugging Face `tokenizers`.

Text is UTF-8 bytes; each of the 256 bytes is a token of its own before any merge, so every
Unicode string encodes without an unknown token and decodes back to itself exactly. `train`
learns merges from a corpus offline (seconds for Tiny Shakespeare); `from_file` loads any
pretrained `tokenizer.json` (GPT-2's included). The tokenizer travels with checkpoints as its
tokenizer.json string.
"""
import json
import pathlib

import numpy as np

from llmx.data.corpus import DataError

END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256


class BPETokenizer:
  """Wraps a `tokenizers.Tokenizer`; ids are int32 numpy arrays, as CharTokenizer's."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  @classmethod
  def train(cls, text: str, vocab_size: int, *, special_tokens=(END_OF_TEXT,),
            min_frequency: int = 2) -> "BPETokenizer":
    """Learns byte-level BPE merges on `text` until the vocabulary (256 bytes, the special
    tokens and the merges) has `vocab_size` entries, or no pair occurs min_frequency times."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size < floor:
      raise DataError(f"data.vocab_size={vocab_size}: a byte-level BPE vocabulary needs at least "
                      f"{floor} entries (256 bytes + {len(special_tokens)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Lines as training sequences: the pre-tokenizer never merges across a newline's word
    # boundary anyway, and the trainer counts words in parallel over them.
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return cls(tokenizer)

  @classmethod
  def from_file(cls, path: str, *, field: str = "data.tokenizer_path") -> "BPETokenizer":
    """A pretrained tokenizer.json (for example GPT-2's)."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
      raise DataError(f"{field}={path!r}: no such file (expected a tokenizer.json)")
    return cls.from_json_string(p.read_text(encoding="utf-8"), source=f"{field}={path!r}")

  @classmethod
  def from_json_string(cls, data: str, *, source: str = "tokenizer") -> "BPETokenizer":
    from tokenizers import Tokenizer
    try:
      return cls(Tokenizer.from_str(data))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception
      raise DataError(f"{source}: not a valid tokenizer.json ({str(e)[:200]})") from None

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  @property
  def end_of_text_id(self) -> int | None:
    return self.token_id(END_OF_TEXT)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def to_json_string(self) -> str:
    """The tokenizer.json text (what `from_json_string` and transformers read)."""
    return self._tokenizer.to_str()

  def save(self, path: str):
    pathlib.Path(path).write_text(self.to_json_string(), encoding="utf-8")

  def to_json(self) -> dict:
    """For checkpoint metadata; CharTokenizer.to_json's counterpart."""
    return {"type": "bpe", "tokenizer_json": self.to_json_string()}

  @classmethod
  def from_json(cls, data: dict) -> "BPETokenizer":
    if data.get("type") != "bpe":
      raise ValueError(f"not a BPE tokenizer: type={data.get('type')!r}")
    return cls.from_json_string(data["tokenizer_json"], source="checkpoint metadata")

  def __eq__(self, other):
    return (isinstance(other, BPETokenizer) and
            json.loads(self.to_json_string()) == json.loads(other.to_json_string()))

  def __repr__(self):
    return f"BPETokenizer(vocab_size={self.vocab_size})"

"""WordPiece tokenizers for BERT through Hugging Face `tokenizers`: trained on a corpus, or loaded
from a Hugging Face folder (tokenizer.json, or vocab.txt + tokenizer_config.json).

The wrapped `tokenizers.Tokenizer` adds [CLS] A [SEP] (B [SEP]) itself; truncation and padding
are done per call here (a folder's own fixed padding, e.g. all-MiniLM-L6-v2's 128, is switched
off) so batches are padded to their longest row or to a fixed length as the caller asks.
"""
import hashlib
import json
import pathlib
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmx.data.corpus import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer:
  def __init__(self, tokenizer: tokenizers.Tokenizer):
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.tokenizer = tokenizer
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    absent = [t for t, i in ids.items() if i is None]
    if absent:
      raise DataError(f"the tokenizer's vocabulary lacks the BERT special tokens {absent}")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
    self.special_ids = np.array(sorted(ids.values()), np.int32)

  # --- construction -------------------------------------------------------------------------
  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
            min_frequency: int = 2) -> "WordPieceTokenizer":
    """Trains a BERT-style WordPiece vocabulary (BERT normaliser and pre-tokeniser, `##`
    continuation prefix) on `texts`; the special tokens get ids 0-4 in SPECIAL_TOKENS order."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##", show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return cls(tok)

  @classmethod
  def from_folder(cls, path) -> "WordPieceTokenizer":
    """A Hugging Face folder: tokenizer.json, or a BERT vocab.txt (lower-cased unless
    tokenizer_config.json says do_lower_case=false)."""
    folder = pathlib.Path(path).expanduser()
    if (folder / "tokenizer.json").is_file():
      return cls(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    if (folder / "vocab.txt").is_file():
      lowercase = True
      if (folder / "tokenizer_config.json").is_file():
        lowercase = json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True)
      from tokenizers.implementations import BertWordPieceTokenizer
      return cls(BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase)._tokenizer)
    raise DataError(f"{folder}: no tokenizer.json or vocab.txt")

  @classmethod
  def from_json(cls, text: str) -> "WordPieceTokenizer":
    return cls(tokenizers.Tokenizer.from_str(text))

  def to_json(self) -> str:
    return self.tokenizer.to_str()

  def fingerprint(self) -> str:
    """A short hash of the whole tokenizer, for checking that a checkpoint used the same one."""
    return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

  def save(self, folder) -> pathlib.Path:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"

  # --- use ----------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def pieces(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text without special tokens: list of int32 arrays."""
    return [np.asarray(e.ids, np.int32) for e in
            self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def encodings(self, texts, pairs=None, *, max_length: int, truncation: str = "longest_first",
                is_pretokenized: bool = False) -> list[tokenizers.Encoding]:
    """`tokenizers.Encoding`s (ids, type ids, offsets, word ids) with special tokens, each at
    most `max_length` long. truncation: "longest_first" or "only_second" (keeps a QA question)."""
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    self.tokenizer.enable_truncation(max_length, strategy=truncation)
    try:
      return self.tokenizer.encode_batch(inputs, is_pretokenized=is_pretokenized)
    except Exception as e:  # tokenizers raises plain Exceptions, e.g. when a question alone is too long
      raise DataError(f"tokenizing with max_length={max_length}: {e}") from None
    finally:
      self.tokenizer.no_truncation()

  def pad(self, encodings, length: int | None = None) -> dict:
    """-> dict of int32 [n, length] arrays: input_ids, token_type_ids, attention_mask (1 real,
    0 padding); length None: the longest row."""
    length = length or max(len(e.ids) for e in encodings)
    out = {k: np.zeros((len(encodings), length), np.int32)
           for k in ("input_ids", "token_type_ids", "attention_mask")}
    out["input_ids"][:] = self.pad_id
    for i, e in enumerate(encodings):
      n = len(e.ids)
      out["input_ids"][i, :n] = e.ids
      out["token_type_ids"][i, :n] = e.type_ids
      out["attention_mask"][i, :n] = 1
    return out

  def __call__(self, texts, pairs=None, *, max_length: int = 512, length: int | None = None) -> dict:
    """Batch encoding as Hugging Face's `tokenizer(texts, padding=True, truncation=True)`."""
    return self.pad(self.encodings(texts, pairs, max_length=max_length), length)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def __repr__(self):
    return f"WordPieceTokenizer(vocab_size={self.vocab_size})"

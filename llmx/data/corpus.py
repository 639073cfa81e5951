"""Text corpora: the embedded default, any UTF-8 file, and the train/validation split."""
import os
import pathlib

from llmx.errors import LlmxError

DATA_DIR_ENV = "LLMX_DATA_DIR"


class DataError(LlmxError, ValueError):
  """Bad data input: the message names the field or file and what would be valid."""


def embedded_corpus() -> str:
  """CPython's bundled documentation text (`pydoc_data.topics`): ~465k characters of real
  English prose and code, present wherever Python is, so the default run needs no download."""
  from pydoc_data import topics
  return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def fingerprint(*parts) -> str:
  """A short digest of texts (or token arrays): a resumed run refuses other data. The embedded
  corpus is CPython's documentation, which changes between Python releases."""
  import hashlib

  import numpy as np
  digest = hashlib.sha256()
  for part in parts:  # each part's length too: moving a split boundary changes the digest
    data = part.encode() if isinstance(part, str) else np.asarray(part, np.int64).tobytes()
    digest.update(len(data).to_bytes(8, "little") + data)
  return digest.hexdigest()[:16]


def data_path(name: str) -> pathlib.Path:
  """`$LLMX_DATA_DIR/name`, for the shared public data sets used by tests and benchmarks."""
  root = os.environ.get(DATA_DIR_ENV)
  if not root:
    raise DataError(f"{DATA_DIR_ENV} is not set; point it at a folder holding {name!r}")
  return pathlib.Path(root) / name


def load_text(path: str | None, *, field: str = "data.path") -> str:
  """Reads a UTF-8 text file, or the embedded corpus when `path` is empty."""
  if not path:
    return embedded_corpus()
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise DataError(f"{field}={path!r}: no such file")
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{field}={path!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not text.strip():
    raise DataError(f"{field}={path!r}: the corpus is empty")
  return text


def split_train_val(tokens, val_fraction: float = 0.1):
  """Contiguous split, as nanoGPT does: the first 90% trains, the last 10% validates."""
  n_train = int(len(tokens) * (1.0 - val_fraction))
  return tokens[:n_train], tokens[n_train:]

"""The safetensors file format, read and written with the `safetensors` package.

What this module adds to the package: a header is checked on its own (names, dtypes, shapes)
before any data is read, tensors are read one at a time as they are used, bfloat16 and float8 come
back as ml_dtypes arrays, integer tensors are refused unless asked, every error names the file,
and a file is rewritten by renaming a new one over it.
"""
import math
import mmap
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import ml_dtypes  # also lets np.dtype("bfloat16") work, which safetensors' numpy reader uses
import numpy as np
import safetensors
import safetensors.numpy

from llmx.formats import CheckpointFormatError

FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                "BF16": np.dtype(ml_dtypes.bfloat16),
                "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
DTYPES = {**FLOAT_DTYPES, "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
          "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
          "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# Dtypes numpy lacks: safetensors 0.8 builds bfloat16 but not float8 (it asks numpy for
# float8_e4m3fn), so these are read from the file directly when the package cannot build them.
_ML_DTYPES = {DTYPES[code] for code in ("BF16", "F8_E4M3", "F8_E5M2")}


class TensorInfo(NamedTuple):
  """Where one tensor lies: enough to check it and to read it later."""
  name: str                 # its name in the file
  dtype: np.dtype
  shape: tuple[int, ...]
  file: pathlib.Path
  begin: int                # byte offsets in the file (not in the data section)
  end: int

  @property
  def is_float(self) -> bool:
    return self.dtype in FLOAT_DTYPES.values()


def _open(file: pathlib.Path):
  """safetensors.safe_open, which checks the header (and refuses absurd header lengths before
  allocating anything), with its errors turned into ones naming the file."""
  try:
    return safetensors.safe_open(file, framework="numpy")
  except OSError as e:
    raise CheckpointFormatError(f"{file}: cannot read ({e.strerror or e})") from None
  except safetensors.SafetensorError as e:
    raise CheckpointFormatError(f"{file}: not a safetensors file, or a damaged one ({e})") from None


def _infos(file: pathlib.Path, handle) -> dict[str, TensorInfo]:
  entries = []
  for name in handle.offset_keys():
    piece = handle.get_slice(name)
    code, shape = piece.get_dtype(), tuple(piece.get_shape())
    if code not in DTYPES:
      raise CheckpointFormatError(f"{file}: bad header entry for tensor {name!r}: dtype {code!r} "
                                  f"(dtypes: {', '.join(DTYPES)})")
    entries.append((name, DTYPES[code], shape, math.prod(shape) * DTYPES[code].itemsize))
  # safe_open has checked that the tensors, in offset order, tile the data section with no gap
  # or overlap up to the end of the file: their offsets in the file follow from their sizes.
  begin, infos = file.stat().st_size - sum(entry[-1] for entry in entries), {}
  for name, dtype, shape, size in entries:
    infos[name] = TensorInfo(name, dtype, shape, file, begin, begin + size)
    begin += size
  return infos


def read_header(file) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Reads and checks a file's header, not its data -> ({name: TensorInfo}, metadata)."""
  file = pathlib.Path(file)
  with _open(file) as handle:
    return _infos(file, handle), handle.metadata() or {}


class _Tensors(Mapping):
  """{name: array}: the files are opened (and checked against `infos`) at once, each tensor is
  read (copied) when it is looked up."""

  def __init__(self, infos: list[TensorInfo]):
    self._infos, self._handles, self._maps = {info.name: info for info in infos}, {}, {}
    for file in dict.fromkeys(info.file for info in infos):
      handle = self._handles[file] = _open(file)
      layout, mine = _infos(file, handle), [info for info in infos if info.file == file]
      changed = [info.name for info in mine if layout.get(info.name) != info]
      if changed:
        raise CheckpointFormatError(f"{file}: changed since its header was read "
                                    f"({', '.join(changed)})")
      if any(info.dtype in _ML_DTYPES for info in mine):  # for __getitem__'s fallback
        try:
          with open(file, "rb") as f:
            self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
          raise CheckpointFormatError(f"{file}: cannot read ({e.strerror or e})") from None

  def __getitem__(self, name: str) -> np.ndarray:
    info = self._infos[name]
    try:
      return self._handles[info.file].get_tensor(name)
    except (TypeError, AttributeError):  # a dtype numpy lacks that this safetensors cannot build
      if info.dtype not in _ML_DTYPES:
        raise
    except safetensors.SafetensorError as e:
      raise CheckpointFormatError(f"{info.file}: cannot read tensor {name!r} ({e})") from None
    # The offsets come from the header safe_open checked (and that matched `infos`).
    data = np.frombuffer(self._maps[info.file], info.dtype, math.prod(info.shape), info.begin)
    return data.reshape(info.shape).copy()

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)


def read_tensors(infos: Iterable[TensorInfo], *,
                 allow_non_float: bool = False) -> Mapping[str, np.ndarray]:
  """The tensors of `infos` (from `read_header`), by name: a mapping that reads each tensor when it
  is looked up (a fresh, writable copy), so a model can be loaded one tensor at a time. Integer
  and bool tensors (position-id buffers, quantization tables) are refused unless
  allow_non_float, so that a weight cannot silently arrive as integers."""
  infos = list(infos)
  if not allow_non_float:
    bad = [f"{i.name} ({i.dtype}) in {i.file}" for i in infos if not i.is_float]
    if bad:
      raise CheckpointFormatError(f"not floating-point tensors: {', '.join(bad)}")
  return _Tensors(infos)


def read_file(file, *, allow_non_float: bool = False) -> Mapping[str, np.ndarray]:
  """Every tensor of one file, by name (see read_tensors)."""
  infos, _ = read_header(file)
  return read_tensors(infos.values(), allow_non_float=allow_non_float)


def write_file(file, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
  """Writes `tensors` ({name: array}, any dtype of DTYPES) as one safetensors file -> its size
  in bytes, with safetensors.numpy.save_file (which lays tensors out widest dtype first, so each
  starts aligned to its item size)."""
  file = pathlib.Path(file)
  arrays = {name: np.ascontiguousarray(x) for name, x in tensors.items()}  # save_file needs it
  unknown = [f"{name} ({x.dtype})" for name, x in arrays.items()
             if x.dtype.newbyteorder("<") not in _CODES]
  if unknown:
    raise CheckpointFormatError(f"{file}: cannot write dtypes safetensors lacks: {', '.join(unknown)}")
  metadata = {str(k): str(v) for k, v in metadata.items()} if metadata else None
  # A new file renamed over the old one: readers still using the old file (safe_open maps it)
  # keep its data (truncating a mapped file in place would crash them), and none sees half a file.
  partial = file.with_name(file.name + ".partial")
  try:
    safetensors.numpy.save_file(arrays, partial, metadata)
    os.replace(partial, file)
  except (OSError, safetensors.SafetensorError) as e:
    partial.unlink(missing_ok=True)
    raise CheckpointFormatError(f"{file}: cannot write ({e})") from None
  return file.stat().st_size

"""The safetensors file format: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw
little-endian bytes of every tensor (offsets count from the end of the header).

Read here without the `safetensors` package so that a header can be checked on its own (names,
dtypes, shapes) before any data is touched, bfloat16 and float8 come back as ml_dtypes arrays
(numpy has neither), and every error names the file.
"""
import json
import math
import mmap
import os
import pathlib
import struct
from typing import Iterable, NamedTuple

import ml_dtypes
import numpy as np

from llmx.formats import CheckpointFormatError

FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                "BF16": np.dtype(ml_dtypes.bfloat16),
                "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
DTYPES = {**FLOAT_DTYPES, "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
          "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
          "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# The reference implementation refuses larger headers; a corrupt length must not make us allocate.
MAX_HEADER_BYTES = 100_000_000


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


def read_header(file) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Reads and checks a file's header, not its data -> ({name: TensorInfo}, metadata)."""
  file = pathlib.Path(file)
  try:
    size = file.stat().st_size
    with open(file, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
      if n is None or n > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointFormatError(f"{file}: not a safetensors file (header length "
                                    f"{n} does not fit in {size} bytes)")
      raw = f.read(n)
  except OSError as e:
    raise CheckpointFormatError(f"{file}: cannot read ({e.strerror or e})") from None
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"{file}: the safetensors header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"{file}: the safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data_start, data_size = 8 + n, size - 8 - n
  infos = {}
  for name, entry in header.items():
    infos[name] = _tensor_info(file, name, entry, data_start, data_size)
  return infos, metadata


def _tensor_info(file, name, entry, data_start, data_size) -> TensorInfo:
  try:
    dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
    ok = (all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
          and isinstance(end, int) and 0 <= begin <= end <= data_size
          and end - begin == math.prod(shape) * dtype.itemsize)
  except (KeyError, TypeError, ValueError):
    ok = False
  if not ok:
    raise CheckpointFormatError(f"{file}: bad header entry for tensor {name!r}: {entry} "
                                f"(dtypes: {', '.join(DTYPES)}; data section of {data_size} bytes)")
  return TensorInfo(name, dtype, shape, file, data_start + begin, data_start + end)


def read_tensors(infos: Iterable[TensorInfo], *,
                 allow_non_float: bool = False) -> dict[str, np.ndarray]:
  """The tensors of `infos` (from `read_header`), by name, as read-only arrays memory-mapped from
  their files: nothing is read until used, so a model can be loaded one tensor at a time.
  Integer and bool tensors (position-id buffers, quantization tables) are refused unless
  allow_non_float, so that a weight cannot silently arrive as integers."""
  infos = list(infos)
  if not allow_non_float:
    bad = [f"{i.name} ({i.dtype}) in {i.file}" for i in infos if not i.is_float]
    if bad:
      raise CheckpointFormatError(f"not floating-point tensors: {', '.join(bad)}")
  maps, out = {}, {}
  for info in infos:
    if info.file not in maps:
      with open(info.file, "rb") as f:
        maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    count = math.prod(info.shape)
    out[info.name] = np.frombuffer(maps[info.file], info.dtype, count, info.begin).reshape(info.shape)
  return out


def read_file(file, *, allow_non_float: bool = False) -> dict[str, np.ndarray]:
  """Every tensor of one file, by name (see read_tensors)."""
  infos, _ = read_header(file)
  return read_tensors(infos.values(), allow_non_float=allow_non_float)


def write_file(file, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
  """Writes `tensors` ({name: array}, any dtype of DTYPES) as one safetensors file -> its size
  in bytes. Tensors are laid out widest dtype first, so each starts aligned to its item size
  (the header is padded to 8 bytes), as the reference writer does."""
  file = pathlib.Path(file)
  arrays = {name: np.ascontiguousarray(x) for name, x in tensors.items()}
  unknown = [f"{name} ({x.dtype})" for name, x in arrays.items()
             if x.dtype.newbyteorder("<") not in _CODES]
  if unknown:
    raise CheckpointFormatError(f"{file}: cannot write dtypes safetensors lacks: {', '.join(unknown)}")
  order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
  header, offset = {}, 0
  for name in order:
    x = arrays[name]
    header[name] = dict(dtype=_CODES[x.dtype.newbyteorder("<")], shape=list(x.shape),
                        data_offsets=[offset, offset + x.nbytes])
    offset += x.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  # A new file renamed over the old one: arrays still mapped from the old file keep their data
  # (truncating a mapped file in place would crash their readers), and no reader sees half a file.
  partial = file.with_name(file.name + ".partial")
  with open(partial, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name in order:
      f.write(arrays[name].astype(arrays[name].dtype.newbyteorder("<"), copy=False).tobytes())
  os.replace(partial, file)
  return 8 + len(raw) + offset

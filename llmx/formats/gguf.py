"""GGUF files (llama.cpp's checkpoint format): metadata and dequantized tensors, read with the
`gguf` package.

GGML lists a tensor's shape with the contiguous axis first; `GGUFFile.tensor` returns numpy
arrays in the usual order (`[out, in]` for a linear layer, as PyTorch stores it). Quantized
blocks run along the contiguous (input) axis, so each row dequantizes on its own.
"""
import pathlib

import numpy as np

from llmx.errors import LlmxError

# Tensor types this reader dequantizes (the gguf package's own numpy dequantizers).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")


class GGUFError(LlmxError, ValueError):
  pass


class GGUFFile:
  """A GGUF file opened for reading (memory-mapped: a tensor is read when asked for)."""

  def __init__(self, path: str | pathlib.Path):
    import gguf
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise GGUFError(f"{self.path}: no such GGUF file")
    try:
      self._reader = gguf.GGUFReader(self.path)
    except Exception as e:  # noqa: BLE001 - any parse failure: not a readable GGUF file
      raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    self.metadata = {name: field.contents() for name, field in self._reader.fields.items()
                     if not name.startswith("GGUF.")}
    self._tensors = {t.name: t for t in self._reader.tensors}
    bad = sorted({t.tensor_type.name for t in self._tensors.values()} - set(SUPPORTED_TYPES))
    if bad:
      names = [n for n, t in self._tensors.items() if t.tensor_type.name in bad][:3]
      raise GGUFError(f"{self.path}: tensor type {', '.join(bad)} (e.g. {', '.join(names)}) is not "
                      f"supported; supported: {', '.join(SUPPORTED_TYPES)}")

  @property
  def architecture(self) -> str:
    return self.metadata.get("general.architecture", "")

  def get(self, key: str, default=None):
    """Metadata value by key, with `{arch}` standing for the architecture
    (`get("{arch}.block_count")`)."""
    return self.metadata.get(key.format(arch=self.architecture), default)

  def require(self, key: str):
    value = self.get(key)
    if value is None:
      raise GGUFError(f"{self.path}: metadata key {key.format(arch=self.architecture)!r} is missing")
    return value

  @property
  def tensor_names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """The numpy shape of a tensor (GGML's order reversed)."""
    return tuple(int(d) for d in reversed(self._tensor(name).shape))

  def tensor_type(self, name: str) -> str:
    return self._tensor(name).tensor_type.name

  def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
    """The dequantized tensor in `dtype`, numpy order."""
    import gguf
    t = self._tensor(name)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(self.shape(name)).astype(dtype, copy=False)

  def _tensor(self, name: str):
    if name not in self._tensors:
      raise GGUFError(f"{self.path}: no tensor named {name!r}")
    return self._tensors[name]

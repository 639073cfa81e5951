"""The autotuning cache: block sizes, warps and stages per device, op, shape and dtype.

A Triton kernel reads its launch parameters at trace time with :func:`get_config`:
the first hit wins among

1. the file named by ``$LLMX_AUTOTUNE_CACHE`` (if set), else the user cache
   ``$XDG_CACHE_HOME/llmx/autotune.json`` (default ``~/.cache/llmx/autotune.json``);
2. the cache shipped inside the package, ``kernels/autotune_cache.json`` (optional);
3. the kernel's own heuristic.

``python -m kernels.bench --autotune`` fills the first file (or ``--cache PATH``).
To ship tuned values, copy the winning entries into ``kernels/autotune_cache.json``
(same format) and include that file as package data.

Entries are keyed ``"<device kind>|<op>|<shape bucket>|<dtype>"``, for example
``"NVIDIA H100 80GB HBM3|softmax.fwd|4096x1024|bfloat16"``. The shape bucket rounds
every dimension up to a power of two, so one entry serves all shapes in a bucket.
The file format is ``{"version": 1, "entries": {key: {"config": {...}, ...}}}``; fields
besides ``config`` (measured time, exact shape, jax version) are informational.
"""
from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Any, Callable, Mapping

import jax

CACHE_ENV = "LLMX_AUTOTUNE_CACHE"
CACHE_VERSION = 1
PACKAGED_CACHE = pathlib.Path(__file__).with_name("autotune_cache.json")

_lock = threading.Lock()
_loaded: dict[str, tuple[float, dict[str, Any]]] = {}  # path -> (mtime, entries)


def next_power_of_2(n: int) -> int:
  """Smallest power of two >= n (1 for n <= 1)."""
  n = int(n)
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-int(a) // int(b))


def user_cache_path() -> pathlib.Path:
  """Where ``--autotune`` writes by default and the first place ops look."""
  env = os.environ.get(CACHE_ENV)
  if env:
    return pathlib.Path(env).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "llmx" / "autotune.json"


def device_kind(device: jax.Device | None = None) -> str:
  """The device kind string the cache is keyed by (``jax.Device.device_kind``)."""
  try:
    device = device or jax.devices()[0]
    return str(device.device_kind).strip()
  except Exception:  # pragma: no cover - no backend at all
    return "unknown"


def shape_bucket(dims) -> str:
  return "x".join(str(next_power_of_2(d)) for d in dims)


def make_key(kind: str, op: str, dims, dtype) -> str:
  return f"{kind}|{op}|{shape_bucket(dims)}|{jax.numpy.dtype(dtype).name}"


def _read(path: pathlib.Path) -> dict[str, Any]:
  """Entries of one cache file, memoised by modification time; {} if absent or bad."""
  key = str(path)
  try:
    mtime = path.stat().st_mtime
  except OSError:
    return {}
  with _lock:
    hit = _loaded.get(key)
    if hit is not None and hit[0] == mtime:
      return hit[1]
  try:
    data = json.loads(path.read_text())
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    if not isinstance(entries, dict):
      entries = {}
  except (OSError, ValueError):
    entries = {}
  with _lock:
    _loaded[key] = (mtime, entries)
  return entries


def cache_paths() -> list[pathlib.Path]:
  """Cache files in lookup order (first hit wins)."""
  return [user_cache_path(), PACKAGED_CACHE]


def lookup(op: str, dims, dtype, *, kind: str | None = None) -> dict[str, Any] | None:
  """The cached config for ``op`` at this shape bucket, or None."""
  key = make_key(kind or device_kind(), op, dims, dtype)
  for path in cache_paths():
    entry = _read(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
      return dict(entry["config"])
  return None


def get_config(op: str, dims, dtype, heuristic: Callable[[], Mapping[str, Any]],
               *, validate: Callable[[Mapping[str, Any]], bool] | None = None) -> dict[str, Any]:
  """Config for a kernel at trace time: cache hit if it is complete and valid, else heuristic."""
  default = dict(heuristic())
  cached = lookup(op, dims, dtype)
  if cached is not None and set(default) <= set(cached):
    cfg = {k: cached[k] for k in default}
    if validate is None or validate(cfg):
      return cfg
  return default


def record(op: str, dims, dtype, config: Mapping[str, Any], *, path: str | os.PathLike | None = None,
           kind: str | None = None, info: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Store a winning config (read-modify-write of the JSON file; creates folders)."""
  path = pathlib.Path(path) if path is not None else user_cache_path()
  kind = kind or device_kind()
  try:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
      data = {}
  except (OSError, ValueError):
    data = {}
  data.setdefault("version", CACHE_VERSION)
  entries = data.setdefault("entries", {})
  entry = {"config": dict(config), "shape": [int(d) for d in dims], "jax": jax.__version__}
  entry.update(info or {})
  entries[make_key(kind, op, dims, dtype)] = entry
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
  os.replace(tmp, path)
  with _lock:
    _loaded.pop(str(path), None)
  return path


def freeze(config: Mapping[str, Any]) -> tuple:
  """A hashable form of a config (for jit static arguments and custom_vjp)."""
  return tuple(sorted(config.items()))

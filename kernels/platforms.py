"""Which platform ``implementation=None`` picks kernels for (``kernels.target_platform``).

The backend defaults are chosen at trace time, when ``jax.default_backend()`` names the
machine doing the tracing, not the one the program is lowered for. On a TPU VM the two
agree. To export a program for another platform from this machine (e.g. a TPU pod job's
train step traced on a CPU host), trace it inside ``target_platform``::

    with kernels.target_platform("tpu"):
      exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*args)

Every op's default then is its TPU default (``"mosaic_tpu"``). jax caches traces per
function: trace a fresh ``jax.jit`` inside the block, not one already traced outside it.
"""
from __future__ import annotations

import contextlib
import threading

import jax

_GPU_NAMES = ("gpu", "cuda", "rocm")
_state = threading.local()


def current() -> str:
  """The platform defaults are chosen for: ``"cpu"``, ``"gpu"``, ``"tpu"``, ..."""
  override = getattr(_state, "platform", None)
  backend = override or jax.default_backend()
  return "gpu" if backend in _GPU_NAMES else backend


def pallas_default(backend: str | None = None) -> str | None:
  """The Pallas backend ``implementation=None`` picks on ``backend`` (default: ``current()``):
  ``"triton"`` on GPUs, ``"mosaic_tpu"`` on TPUs, None elsewhere (each op then picks among
  its XLA implementations)."""
  backend = backend or current()
  if backend in _GPU_NAMES:
    return "triton"
  return "mosaic_tpu" if backend == "tpu" else None


@contextlib.contextmanager
def target_platform(platform: str):
  """Within the block, ``implementation=None`` picks kernels for ``platform``."""
  platform = str(platform).lower()
  if platform not in ("cpu", "tpu") + _GPU_NAMES:
    raise ValueError(f"target_platform: unknown platform {platform!r}; choose cpu, gpu "
                     "(cuda, rocm) or tpu")
  previous = getattr(_state, "platform", None)
  _state.platform = platform
  try:
    yield
  finally:
    _state.platform = previous


__all__ = ["current", "pallas_default", "target_platform"]

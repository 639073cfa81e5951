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
# mosaic_gpu_common.MIN_JAX (not imported: mosaic_gpu_common imports this module).
MOSAIC_GPU_MIN_JAX = (0, 11)
_state = threading.local()


def current() -> str:
  """The platform defaults are chosen for: ``"cpu"``, ``"gpu"``, ``"tpu"``, ..."""
  override = getattr(_state, "platform", None)
  backend = override or jax.default_backend()
  return "gpu" if backend in _GPU_NAMES else backend


def pallas_default(backend: str | None = None) -> str | None:
  """The Pallas backend ``implementation=None`` picks on ``backend`` (default: ``current()``):
  on GPUs ``"mosaic_gpu"`` with JAX >= 0.11 (where Pallas's Triton backend is deprecated),
  else ``"triton"``; ``"mosaic_tpu"`` on TPUs; None elsewhere (each op then picks among its
  XLA implementations). An op whose Mosaic GPU kernel cannot serve a call (dtype, shape)
  falls back to ``"triton"`` (see ``gpu_fallback``)."""
  backend = backend or current()
  if backend in _GPU_NAMES:
    jax_version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    return "mosaic_gpu" if jax_version >= MOSAIC_GPU_MIN_JAX else "triton"
  return "mosaic_tpu" if backend == "tpu" else None


def gpu_fallback(name: str, explicit: bool, unsupported) -> str:
  """The implementation to run: ``name``, or ``"triton"`` when ``name`` is the default
  ``"mosaic_gpu"`` (``explicit`` False) and ``unsupported()`` gives a reason it cannot serve
  this call. An explicit ``implementation="mosaic_gpu"`` keeps its one-line error instead."""
  if name == "mosaic_gpu" and not explicit and unsupported() is not None:
    return "triton"
  return name


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


__all__ = ["current", "pallas_default", "gpu_fallback", "target_platform"]

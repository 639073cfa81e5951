"""Fused softmax: ``kernels.softmax(x, axis=-1, where=None, *, scale=1.0, implementation=None)``.

Implementations (one backend file each, registered in ``_IMPLEMENTATIONS``):

* ``"xla"``    -- ``reference.py``: one fused jnp expression; XLA's autodiff.
* ``"triton"`` -- ``triton.py``: Pallas Triton forward and backward kernels, blocked over
  long rows with an online max/sum.
* ``"mosaic_tpu"`` -- ``mosaic_tpu.py``: Pallas TPU (Mosaic) forward and backward kernels,
  whole rows per block, padded inside the op to TPU tiles.
* ``"mosaic_gpu"`` -- ``mosaic_gpu.py``: Pallas Mosaic GPU (``plgpu``, Hopper) forward and
  backward kernels, TMA-pipelined column blocks; JAX >= 0.11.

``implementation=None`` picks ``"mosaic_gpu"`` on GPUs with JAX >= 0.11 (``"triton"`` on
older JAX, or for a dtype the Mosaic GPU kernels do not take), ``"mosaic_tpu"`` on TPUs and
``"xla"`` elsewhere (the platform is ``kernels.platforms.current()``: see
``kernels.target_platform``).
"""
from __future__ import annotations

import importlib
import numbers

import jax
import jax.numpy as jnp

from .. import platforms

# implementation name -> module holding a ``softmax(x, where, *, axis, scale, interpret)``.
_IMPLEMENTATIONS = {
    "xla": ".reference",
    "triton": ".triton",
    "mosaic_tpu": ".mosaic_tpu",
    "mosaic_gpu": ".mosaic_gpu",
}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)


def default_implementation(backend: str | None = None) -> str:
  return platforms.pallas_default(backend) or "xla"


def get_implementation(name: str | None, x=None):
  """The backend's ``softmax``; with ``name=None`` the platform default for input ``x``."""
  explicit = name is not None
  name = default_implementation() if name is None else name
  if x is not None:
    name = platforms.gpu_fallback(name, explicit, lambda: importlib.import_module(
        ".mosaic_gpu", __name__).unsupported(x))
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"softmax: unknown implementation={name!r}; choose from "
                     f"{', '.join(IMPLEMENTATIONS)} or None")
  return importlib.import_module(_IMPLEMENTATIONS[name], __name__).softmax


def _normalize_axes(axis, ndim):
  axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  if not axes or not all(isinstance(a, numbers.Integral) for a in axes):
    raise ValueError(f"softmax: axis must be an int or a non-empty tuple of ints, got {axis!r}")
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"softmax: axis={a} is out of range for x with {ndim} dimensions")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"softmax: repeated axis in axis={axis!r}")
  return tuple(sorted(out))


def softmax(x, axis=-1, where=None, *, scale=1.0, implementation=None, interpret=False):
  """Softmax of ``scale * x`` along ``axis``, like ``jax.nn.softmax`` where they overlap.

  Args:
    x: floating-point array.
    axis: int or tuple of ints.
    where: optional boolean array broadcastable to ``x``; masked entries get
      probability 0 and a row with nothing allowed returns zeros (not NaN).
    scale: static Python number multiplying ``x`` before the softmax.
    implementation: ``None`` (backend default), ``"xla"``, ``"triton"``, ``"mosaic_tpu"`` or
      ``"mosaic_gpu"``.
    interpret: run Pallas kernels in interpret mode (CPU testing).

  Returns:
    Probabilities in ``x.dtype`` (statistics computed in float32).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"softmax: x must be a floating-point array, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError("softmax: x must have at least one dimension, got a scalar")
  axes = _normalize_axes(axis, x.ndim)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise TypeError(f"softmax: where must be a boolean array, got dtype {where.dtype}")
    try:
      ok = tuple(jnp.broadcast_shapes(where.shape, x.shape)) == x.shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"softmax: where shape {where.shape} is not broadcastable to x shape "
                       f"{x.shape}")
  if isinstance(scale, jax.Array) or not isinstance(scale, numbers.Real):
    raise TypeError(f"softmax: scale must be a static Python number, got {type(scale).__name__}")
  fn = get_implementation(implementation, x)
  if x.size == 0:
    fn = get_implementation("xla")
  return fn(x, where, axis=axes, scale=float(scale), interpret=interpret)


__all__ = ["softmax", "IMPLEMENTATIONS", "default_implementation"]

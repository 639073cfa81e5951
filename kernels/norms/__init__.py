"""Layer norm and RMS norm over the last axis, statistics in float32.

``kernels.layer_norm(x, scale, offset, *, epsilon=1e-6, implementation=None)`` and
``kernels.rms_norm(x, scale, *, epsilon=1e-6, implementation=None)``.

Implementations (one backend file each, registered in ``_IMPLEMENTATIONS``):

* ``"xla"``    -- ``reference.py``: one fused jnp expression; XLA's autodiff.
* ``"triton"`` -- ``triton.py``: Pallas Triton forward and backward kernels
  (``dx``, ``dscale``, ``doffset``).
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

# implementation name -> module holding ``layer_norm(...)`` and ``rms_norm(...)``.
_IMPLEMENTATIONS = {
    "xla": ".reference",
    "triton": ".triton",
    "mosaic_tpu": ".mosaic_tpu",
    "mosaic_gpu": ".mosaic_gpu",
}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)


def default_implementation(backend: str | None = None) -> str:
  return platforms.pallas_default(backend) or "xla"


def get_implementation(op: str, name: str | None, arrays=None):
  """The backend's ``op``; with ``name=None`` the platform default for ``arrays``."""
  explicit = name is not None
  name = default_implementation() if name is None else name
  if arrays is not None:
    name = platforms.gpu_fallback(name, explicit, lambda: importlib.import_module(
        ".mosaic_gpu", __name__).unsupported(*arrays))
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"{op}: unknown implementation={name!r}; choose from "
                     f"{', '.join(IMPLEMENTATIONS)} or None")
  return getattr(importlib.import_module(_IMPLEMENTATIONS[name], __name__), op)


def _check(op, x, params, epsilon):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{op}: x must be a floating-point array, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
  d = x.shape[-1]
  out = []
  for name, p in params:
    if p is not None:
      p = jnp.asarray(p)
      if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"{op}: {name} must be a floating-point array, got dtype {p.dtype}")
      if p.shape != (d,):
        raise ValueError(f"{op}: {name} must have shape ({d},) to match x.shape[-1], "
                         f"got {p.shape}")
    out.append(p)
  if isinstance(epsilon, jax.Array) or not isinstance(epsilon, numbers.Real) or epsilon < 0:
    raise ValueError(f"{op}: epsilon must be a non-negative Python number, got {epsilon!r}")
  return x, out


def layer_norm(x, scale, offset, *, epsilon=1e-6, implementation=None, interpret=False):
  """``(x - mean) / sqrt(var + epsilon) * scale + offset`` over the last axis.

  ``scale`` and ``offset`` have shape ``[x.shape[-1]]`` (either may be None: no scale,
  no offset). Output in ``x.dtype``; gradients for ``x``, ``scale`` and ``offset``.
  """
  x, (scale, offset) = _check("layer_norm", x, (("scale", scale), ("offset", offset)), epsilon)
  fn = get_implementation("layer_norm", implementation, (x, scale, offset))
  if x.size == 0:
    fn = get_implementation("layer_norm", "xla")
  return fn(x, scale, offset, epsilon=float(epsilon), interpret=interpret)


def rms_norm(x, scale, *, epsilon=1e-6, implementation=None, interpret=False):
  """``x / sqrt(mean(x**2) + epsilon) * scale`` over the last axis (``scale`` may be None)."""
  x, (scale,) = _check("rms_norm", x, (("scale", scale),), epsilon)
  fn = get_implementation("rms_norm", implementation, (x, scale))
  if x.size == 0:
    fn = get_implementation("rms_norm", "xla")
  return fn(x, scale, epsilon=float(epsilon), interpret=interpret)


__all__ = ["layer_norm", "rms_norm", "IMPLEMENTATIONS", "default_implementation"]

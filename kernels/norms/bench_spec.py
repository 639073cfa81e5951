"""Layer norm and RMS norm as the bench tool sees them (``--op=layer_norm``, ``--op=rms_norm``).

Shapes ``NxD``: rows by normalised width. Counts per element: layer norm forward 8 FLOPs,
backward 12 more; RMS norm 5 and 9. Bytes: x and y (plus dy and dx in the backward) per
element, and the scale (and offset) vectors with their gradients once per row width.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import IMPLEMENTATIONS, layer_norm, rms_norm
from ..bench.spec import OpSpec, fwd_bwd_sweeps, itemsize, normal


def _inputs(dims, dtype, key, with_offset=True):
  k1, k2, k3 = jax.random.split(key, 3)
  n, d = dims
  args = [normal(k1, (n, d), dtype, 2.0), 1.0 + normal(k2, (d,), dtype, 0.1)]
  if with_offset:
    args.append(normal(k3, (d,), dtype, 0.1))
  return tuple(args), tuple(range(len(args)))


def _run_layer_norm(impl, args, interpret):
  return layer_norm(*args, implementation=impl, interpret=interpret)


def _run_rms_norm(impl, args, interpret):
  return rms_norm(*args, implementation=impl, interpret=interpret)


def _tuning_problems(op, dims, dtype, interpret):
  from . import triton as mod
  n, d = dims
  x = normal(jax.random.key(1), dims, dtype)
  w = jnp.ones((d,), dtype)
  b = jnp.zeros((d,), dtype) if op == "layer_norm" else None
  dy = normal(jax.random.key(2), dims, dtype)
  _, mean, rstd = mod.forward(x, w, b, eps=1e-6, config=mod.heuristic_config("fwd", dims, dtype),
                              interpret=interpret)
  return mod, {
      "fwd": (lambda c: lambda a, ww: mod.forward(a, ww, b, eps=1e-6, config=c,
                                                   interpret=interpret), (x, w)),
      "bwd": (lambda c: lambda a, ww, gg: mod.backward(a, ww, gg, mean, rstd, config=c,
                                                        interpret=interpret), (x, w, dy)),
  }


def _mosaic_gpu_sweeps(op, dims, dtype, interpret):
  """``mosaic_gpu.py``'s fwd and bwd kernels through the op with ``config=``."""
  from . import mosaic_gpu as mod
  centered = op == "layer_norm"
  args, _ = _inputs(dims, dtype, jax.random.key(1), with_offset=centered)
  call = functools.partial(getattr(mod, op), interpret=interpret)
  return fwd_bwd_sweeps(f"{op}.mosaic_gpu", dims, dtype, mod, call, args,
                        normal(jax.random.key(2), dims, dtype), centered=centered)


def _bytes(dims, dtype, mode, *, vectors):
  """x and y (and dy, dx, plus re-reading x) per element; ``vectors`` per row width: scale
  and offset read (and their gradients written) by the forward (and the backward)."""
  fwd_bwd = mode == "fwd_bwd"
  return (math.prod(dims) * (5 if fwd_bwd else 2)
          + dims[1] * vectors[fwd_bwd]) * itemsize(dtype)


def _spec(name, run, inputs, fwd_flops, bwd_flops, vectors):
  return OpSpec(
      name, "NxD", 2, ("8192x1024", "8192x4096", "4096x12288"), tuple(IMPLEMENTATIONS), inputs,
      run,
      flops=lambda dims, mode: math.prod(dims) * (fwd_flops
                                                  + (bwd_flops if mode == "fwd_bwd" else 0.0)),
      bytes=functools.partial(_bytes, vectors=vectors),
      size=lambda dims: math.prod(dims), size_doc="N*D", memory_bound=True,
      tuning_problems=functools.partial(_tuning_problems, name),
      mosaic_gpu_sweeps=functools.partial(_mosaic_gpu_sweeps, name))


SPECS = {
    "layer_norm": _spec("layer_norm", _run_layer_norm, _inputs, 8.0, 12.0, vectors=(2, 6)),
    "rms_norm": _spec("rms_norm", _run_rms_norm, functools.partial(_inputs, with_offset=False),
                      5.0, 9.0, vectors=(1, 3)),
}

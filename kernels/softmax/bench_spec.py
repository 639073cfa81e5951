"""Softmax as the bench tool sees it (``python -m kernels.bench --op=softmax``).

Shapes ``RxC``: rows by row length. Counts per element: forward 5 FLOPs (max, subtract, exp,
sum, divide), reads x and writes p; the backward adds 4 FLOPs and reads p and g, writes dx.
"""
from __future__ import annotations

import math

import jax

from . import IMPLEMENTATIONS, softmax
from ..bench.spec import OpSpec, fwd_bwd_sweeps, itemsize, normal


def _inputs(dims, dtype, key):
  return (normal(key, dims, dtype, 2.0),), (0,)


def _run(impl, args, interpret):
  return softmax(args[0], implementation=impl, interpret=interpret)


def _tuning_problems(dims, dtype, interpret):
  from . import triton as mod
  x = normal(jax.random.key(1), dims, dtype)
  g = normal(jax.random.key(2), dims, dtype)
  p = mod.forward(x, None, scale=1.0, config=mod.heuristic_config("fwd", dims, dtype),
                  interpret=interpret)
  return mod, {
      "fwd": (lambda c: lambda a: mod.forward(a, None, scale=1.0, config=c, interpret=interpret),
              (x,)),
      "bwd": (lambda c: lambda a, b: mod.backward(a, b, scale=1.0, config=c,
                                                   interpret=interpret), (p, g)),
  }


def _mosaic_gpu_sweeps(dims, dtype, interpret):
  """``mosaic_gpu.py``'s fwd and bwd kernels through its ``softmax(..., config=)``."""
  from . import mosaic_gpu as mod
  x = normal(jax.random.key(1), dims, dtype)
  call = lambda a, config: mod.softmax(a, None, axis=(1,), scale=1.0, interpret=interpret,
                                       config=config)
  return fwd_bwd_sweeps("softmax.mosaic_gpu", dims, dtype, mod, call, (x,),
                        normal(jax.random.key(2), dims, dtype))


SPECS = {
    "softmax": OpSpec(
        "softmax", "RxC", 2, ("4096x1024", "4096x8192", "1024x50257"), tuple(IMPLEMENTATIONS),
        _inputs, _run,
        flops=lambda dims, mode: math.prod(dims) * (5.0 + (4.0 if mode == "fwd_bwd" else 0.0)),
        bytes=lambda dims, dt, mode: (math.prod(dims) * itemsize(dt)
                                      * (5 if mode == "fwd_bwd" else 2)),
        size=lambda dims: math.prod(dims), size_doc="R*C", memory_bound=True,
        tuning_problems=_tuning_problems, mosaic_gpu_sweeps=_mosaic_gpu_sweeps),
}

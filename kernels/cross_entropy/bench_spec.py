"""Linear cross-entropy as the bench tool sees it (``--op=linear_cross_entropy``), and the
memory check of the chunked implementation (``--memory-check``).

Shapes ``NxDxV``: tokens, hidden width, vocabulary. FLOPs: the ``[N, D] @ [D, V]`` logits
matmul, three of them with the backward (the backward's logits recomputation is not
counted). Bytes: x and the weight (read again and their gradients written in the backward)
and the float32 per-token losses.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import IMPLEMENTATIONS, linear_cross_entropy
from ..bench.spec import OpSpec, fwd_bwd_sweeps, itemsize, normal
from ..bench.timing import compiled_temp_bytes

MEMORY_CHECK_SHAPE = (8192, 512, 32768)
MEMORY_CHECK_RATIO = 1 / 16


def _inputs(dims, dtype, key):
  n, d, v = dims
  k1, k2, k3 = jax.random.split(key, 3)
  x = normal(k1, (n, d), dtype)
  w = normal(k2, (d, v), dtype, d ** -0.5)
  labels = jax.random.randint(k3, (n,), 0, v)
  return (x, w, labels), (0, 1)


def _run(impl, args, interpret):
  return linear_cross_entropy(*args, implementation=impl, interpret=interpret)


def _bytes(dims, dtype, mode):
  n, d, v = dims
  return (n * d + d * v) * itemsize(dtype) * (3 if mode == "fwd_bwd" else 1) + 4 * n


def _tuning_problems(dims, dtype, interpret):
  from . import triton as mod
  (x, w, labels), _ = _inputs(dims, dtype, jax.random.key(1))
  lse, _, _ = mod.forward(x, w, labels, smoothing=0.0,
                          config=mod.heuristic_config("fwd", dims, dtype), interpret=interpret)
  gs = jnp.full((dims[0],), 1.0 / dims[0], jnp.float32)
  return mod, {
      "fwd": (lambda c: lambda a, ww: mod.forward(a, ww, labels, smoothing=0.0, config=c,
                                                   interpret=interpret), (x, w)),
      "bwd": (lambda c: lambda a, ww: mod.backward(a, ww, labels, lse, gs, smoothing=0.0,
                                                    z_loss=0.0, config=c, interpret=interpret),
              (x, w)),
  }


def _mosaic_gpu_sweeps(dims, dtype, interpret):
  """``mosaic_gpu.py``'s fwd (logits + log-sum-exp) and bwd kernels through its
  ``per_token_loss(..., config=)``."""
  from . import mosaic_gpu as mod
  (x, w, labels), _ = _inputs(dims, dtype, jax.random.key(1))
  call = lambda a, ww, config: mod.per_token_loss(a, ww, labels, interpret=interpret,
                                                  config=config)
  return fwd_bwd_sweeps("linear_cross_entropy.mosaic_gpu", dims, dtype, mod, call, (x, w),
                        normal(jax.random.key(2), (dims[0],), jnp.float32))


def _memory_report(rows, shapes) -> list[str]:
  """Per shape, the compiled temporary memory of "xla_chunked" over "xla" (when both ran)."""
  temps = {(r["dims"], r["impl"]): r.get("temp_bytes") for r in rows}
  lines = []
  for dims in shapes:
    key = "x".join(map(str, dims))
    a, b = temps.get((key, "xla")), temps.get((key, "xla_chunked"))
    if a and b:
      lines.append(f"# memory {key}: xla_chunked / xla temp = {b / a:.4f}")
  return lines


def memory_check(dims=MEMORY_CHECK_SHAPE, dtype=jnp.float32) -> dict:
  """Compiled temporary memory of the cross-entropy fwd+bwd: "xla" vs "xla_chunked"."""
  n, d, v = dims
  avals = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
           jax.ShapeDtypeStruct((n,), jnp.int32))
  out = {"shape": list(dims), "dtype": jnp.dtype(dtype).name, "platform": jax.default_backend()}
  for impl in ("xla", "xla_chunked"):
    f = jax.jit(jax.value_and_grad(
        lambda x, w, l, impl=impl: linear_cross_entropy(x, w, l, implementation=impl), (0, 1)))
    out[impl] = compiled_temp_bytes(f, *avals)
  out["ratio"] = out["xla_chunked"] / out["xla"]
  out["ok"] = out["ratio"] <= MEMORY_CHECK_RATIO
  return out


SPECS = {
    "linear_cross_entropy": OpSpec(
        "linear_cross_entropy", "NxDxV", 3, ("8192x512x32768", "8192x1024x50257"),
        tuple(IMPLEMENTATIONS), _inputs, _run,
        flops=lambda dims, mode: 2.0 * math.prod(dims) * (3 if mode == "fwd_bwd" else 1),
        bytes=_bytes, size=lambda dims: dims[0] * dims[2], size_doc="N*V", memory_bound=False,
        tuning_problems=_tuning_problems, report=_memory_report,
        mosaic_gpu_sweeps=_mosaic_gpu_sweeps),
}

"""Measuring one benchmark row: the timed function, wall time, error, compiled memory.

``bench_one`` builds an op's forward (or forward plus VJP), compiles it once, times it
(device-synchronised, after warm-up), compares it with the float32 ``"xla"`` reference and
reads XLA's compiled temporary memory; ``roofline.add_percent_of_peak`` adds %peak. The
pieces (``time_fn``, ``compiled_temp_bytes``, ``max_errors``) serve other bench tools too
(``python -m kernels.attention.bench``).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import autotune
from . import roofline
from .spec import OpSpec, normal

# Pallas implementations: on CPU they run in interpret mode (the TPU interpreter for mosaic_tpu,
# the GPU interpreter for mosaic_gpu).
PALLAS_IMPLS = ("triton", "mosaic_tpu", "mosaic_gpu")


def build_fn(spec: OpSpec, impl: str, mode: str, diff: tuple[int, ...], interpret: bool):
  """The function to time: forward, or forward plus VJP for a fixed cotangent."""
  def fwd(*args):
    return spec.run(impl, args, interpret)
  if mode == "fwd":
    return fwd

  def fwd_bwd(ct, *args):
    def f(*dargs):
      full = list(args)
      for i, a in zip(diff, dargs):
        full[i] = a
      return fwd(*full)
    out, vjp = jax.vjp(f, *[args[i] for i in diff])
    return out, vjp(ct.astype(out.dtype))
  return fwd_bwd


def cotangent(spec: OpSpec, args):
  """A fixed float32 cotangent shaped like the op's output (the VJP's input in fwd_bwd)."""
  out = jax.eval_shape(lambda *a: spec.run("xla", a, False), *args)
  return normal(jax.random.key(7), out.shape, jnp.float32)


def abstract(args):
  return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)


def time_fn(fn: Callable, args, *, warmup: int, reps: int) -> list[float]:
  """Wall seconds of ``reps`` calls of ``fn(*args)``, each waited for, after ``warmup`` calls
  (at least one: the first call of a jitted function compiles)."""
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(reps, 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def temp_bytes(compiled) -> int | None:
  try:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else None
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def compiled_temp_bytes(jitted, *args) -> int | None:
  """XLA's compiled memory analysis: temporary bytes of ``jitted`` at these arguments."""
  try:
    return temp_bytes(jitted.lower(*args).compile())
  except Exception:  # noqa: BLE001
    return None


def max_errors(a, b, *, floor: float = 1e-30) -> tuple[float, float]:
  """(max abs error, max error relative to each leaf's largest reference magnitude, or to
  ``floor`` when that is smaller)."""
  abs_err = rel_err = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    if not x.size:
      continue
    if not np.isfinite(x).all():
      return float("inf"), float("inf")
    e = float(np.max(np.abs(x - y)))
    abs_err = max(abs_err, e)
    rel_err = max(rel_err, e / max(float(np.max(np.abs(y))), floor))
  return abs_err, rel_err


def _peak_bytes_in_use() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
  except Exception:  # noqa: BLE001
    return None


_REF_CACHE: dict = {}  # the float32 reference of the latest (op, shape, dtype, mode)


def _skip_reason(spec: OpSpec, impl: str, dims, on_cpu: bool, interpret: bool,
                 max_interpret_size: int) -> str | None:
  """Why a row cannot run here (the platform lacks the backend, or interpret mode is too
  slow for the size), or None."""
  if on_cpu and impl == "cudnn":
    return "cudnn needs a GPU"
  if not on_cpu and (impl == "mosaic_tpu") != (jax.default_backend() == "tpu") and (
      impl in ("mosaic_tpu", "triton", "cudnn", "mosaic_gpu")):
    return f"{impl} does not run on {jax.default_backend()}"
  if interpret and spec.size(dims) > max_interpret_size:
    return (f"skipped: size {spec.size(dims)} > --max-interpret-size "
            f"{max_interpret_size} for interpret mode")
  return None


def bench_one(spec: OpSpec, impl: str, dims: tuple, dtype, mode: str, *, warmup: int, reps: int,
              device_spec: roofline.DeviceSpec | None, on_cpu: bool,
              max_interpret_size: int) -> dict:
  """One table row (a dict, also the JSON line): times, throughput, %peak, error, memory;
  or ``error`` saying why the row did not run."""
  interpret = on_cpu and impl in PALLAS_IMPLS
  row = {"op": spec.name, "impl": impl, "shape": list(dims), "dims": "x".join(map(str, dims)),
         "dtype": jnp.dtype(dtype).name, "mode": mode, "platform": jax.default_backend(),
         "device_kind": autotune.device_kind(), "interpret": interpret}
  skip = _skip_reason(spec, impl, dims, on_cpu, interpret, max_interpret_size)
  if skip is not None:
    row["error"] = skip
    return row
  args, diff = spec.make_inputs(dims, dtype, jax.random.key(0))
  fn = build_fn(spec, impl, mode, diff, interpret)
  ref_fn = build_fn(spec, "xla", mode, diff, False)
  ref_args = tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
                   for a in args)
  if mode == "fwd_bwd":
    ct = cotangent(spec, args)
    args, ref_args = (ct,) + args, (ct,) + ref_args
  try:
    compiled = jax.jit(fn).lower(*args).compile()  # compiled once: timing and memory
    out = jax.block_until_ready(compiled(*args))
    if interpret:
      warmup, reps = 0, min(reps, 2)
    times = time_fn(compiled, args, warmup=warmup, reps=reps)
  except Exception as e:  # noqa: BLE001 - report and carry on with other rows
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row
  ref_key = (spec.name, tuple(dims), jnp.dtype(dtype).name, mode)
  if ref_key not in _REF_CACHE:
    _REF_CACHE.clear()
    _REF_CACHE[ref_key] = jax.jit(ref_fn)(*ref_args)
  ref = _REF_CACHE[ref_key]
  median = statistics.median(times)
  row["max_abs_err"], row["max_rel_err"] = max_errors(out, ref)
  flops, nbytes = spec.flops(dims, mode), spec.bytes(dims, dtype, mode)
  row.update(median_s=median, min_s=min(times), reps=len(times), flops=flops, bytes=nbytes,
             tflops=flops / median / 1e12, gbps=nbytes / median / 1e9,
             temp_bytes=temp_bytes(compiled),
             peak_bytes_in_use=None if on_cpu else _peak_bytes_in_use())
  roofline.add_percent_of_peak(row, device_spec, dtype, memory_bound=spec.memory_bound)
  return row

"""The GPU report's cells: compile ahead, check numerics, time.

Compiling dominates the report's time (a few hundred kernels; seconds each), and XLA, the
Triton and the Mosaic GPU compilers release the GIL while they run: ``Compiler`` compiles cells
from their abstract shapes in a thread pool, in measuring order, while the main thread times the
cells already compiled (``workers=0``: compile in the main thread, when the cell is reached).
Each cell's inputs are made once per row and shared by the row's implementations.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from . import timing
from .gpu_plan import Entry

DTYPE = jnp.bfloat16
# Relative error (to the largest reference magnitude) that passes at bf16, or twice XLA's own.
TOLERANCE = 3e-2


def short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def abstract_call(e: Entry, dtype=DTYPE, interpret=False):
  """(function, ShapeDtypeStructs) of a cell, without making its (possibly large) inputs."""
  spec = e.spec()
  diff = []

  def inputs(key):
    args, d = spec.make_inputs(e.dims, dtype, key)
    diff.append(d)
    return args
  args = tuple(jax.eval_shape(inputs, jax.random.key(0)))
  fn = timing.build_fn(spec, e.impl, e.mode, diff[0], interpret)
  if e.mode == "fwd_bwd":
    out = jax.eval_shape(lambda *a: spec.run("xla", a, False), *args)
    args = (jax.ShapeDtypeStruct(out.shape, jnp.float32),) + args
  return fn, args


def make_inputs(e: Entry, dtype=DTYPE):
  """The cell's arguments (the cotangent first for fwd_bwd), the same for every implementation."""
  spec = e.spec()
  args, _ = spec.make_inputs(e.dims, dtype, jax.random.key(0))
  if e.mode == "fwd_bwd":
    args = (timing.cotangent(spec, args),) + tuple(args)
  return tuple(args)


def to_f32(args):
  return tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
               for a in args)


def compile_cell(e: Entry, interpret=False, dtype=DTYPE):
  """(compiled executable, seconds) of one cell."""
  t0 = time.perf_counter()
  fn, avals = abstract_call(e, dtype, interpret)
  compiled = jax.jit(fn).lower(*avals).compile()
  return compiled, time.perf_counter() - t0


def compile_check(e: Entry, interpret=False):
  """The numerics check's three executables at ``e``'s (small) shape: the implementation, the
  bf16 ``xla`` row and the float32 ``xla`` reference."""
  xla = dataclasses.replace(e, impl="xla")
  return (compile_cell(e, interpret)[0], compile_cell(xla)[0],
          compile_cell(xla, dtype=jnp.float32)[0])


def run_check(e: Entry, compiled) -> dict:
  """Max error of the implementation against float32 ``xla``; the verdict allows ``TOLERANCE``
  or twice the error of the bf16 ``xla`` row."""
  impl_fn, xla_fn, ref_fn = compiled
  args = make_inputs(e)
  ref = ref_fn(*to_f32(args))
  err = timing.max_errors(impl_fn(*args), ref)[1]
  base = timing.max_errors(xla_fn(*args), ref)[1]
  ok = err <= max(TOLERANCE, 2 * base)
  return {"check": "pass" if ok else "FAIL", "rel_err": err, "xla_bf16_rel_err": base}


def check_numerics(e: Entry, interpret=False) -> dict:
  """``compile_check`` + ``run_check``; an exception becomes ``check: error``."""
  try:
    return run_check(e, compile_check(e, interpret))
  except Exception as ex:  # noqa: BLE001 - an implementation that fails says why
    return {"check": "error", "error": short(ex)}


def time_batched(fn, args, *, cell_s: float, max_n: int = 200) -> tuple[float, int]:
  """Seconds per call and calls timed: calls are queued back to back in batches (device time
  plus what dispatch cannot hide, not a per-call host round trip) of about ``cell_s`` seconds,
  at most ``max_n`` calls (queued calls hold their outputs); the median of 3 batches (one call
  when a call takes longer than ``cell_s``)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  if one > cell_s:
    return one, 1
  n = int(min(max_n, max(1, cell_s / max(one, 1e-6))))
  per = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    per.append((time.perf_counter() - t0) / n)
  return statistics.median(per), 3 * n


def time_cell(e: Entry, compiled, args, ceilings: dict, cell_s: float) -> dict:
  """Throughput of one compiled cell, with % of the measured ceilings."""
  spec = e.spec()
  flops, nbytes = spec.flops(e.dims, e.mode), spec.bytes(e.dims, DTYPE, e.mode)
  try:  # at most ~16 GB of outputs in flight
    median, calls = time_batched(compiled, args, cell_s=cell_s,
                                 max_n=int(min(200, max(2, 16e9 / nbytes))))
  except Exception as ex:  # noqa: BLE001 - OOM, a launch failure: the cell says so
    return {"status": "error", "error": short(ex)}
  row = {"status": "ok", "median_s": median, "calls": calls, "flops": flops, "bytes": nbytes,
         "tflops": flops / median / 1e12, "gbps": nbytes / median / 1e9}
  row["pct_matmul"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
  row["pct_copy"] = 100 * row["gbps"] / ceilings["copy_gbps"]
  return row


class _Lazy:
  """A future that runs its function in the caller's thread, on first ``result()``."""

  def __init__(self, fn, *args):
    self._fn, self._args, self._done, self._value, self._exc = fn, args, False, None, None

  def result(self, timeout=None):
    del timeout
    if not self._done:
      self._done = True
      try:
        self._value = self._fn(*self._args)
      except Exception as ex:  # noqa: BLE001 - re-raised to the caller, as a future would
        self._exc = ex
    if self._exc is not None:
      raise self._exc
    return self._value


class Compiler:
  """Compiles ahead in ``workers`` threads; a job whose group is past its deadline returns None.

  ``deadlines[group]`` is set when the group starts measuring; until then its jobs compile.
  """

  def __init__(self, workers: int):
    self.pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
    self.deadlines: dict = {}

  def _job(self, group, fn, *args):
    if time.perf_counter() > self.deadlines.get(group, float("inf")):
      return None
    return fn(*args)

  def submit(self, group, fn, *args):
    if self.pool is None:
      return _Lazy(self._job, group, fn, *args)
    return self.pool.submit(self._job, group, fn, *args)

  def shutdown(self):
    if self.pool is not None:
      self.pool.shutdown(wait=False, cancel_futures=True)

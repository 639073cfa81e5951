"""The autotuning sweep: time each candidate config of an op's kernels, keep the best.

Triton: an op's spec says which kernels to sweep (``OpSpec.tuning_problems``); its ``triton.py``
says which configs to try (``candidate_configs``, ``heuristic_config``). Mosaic GPU: the spec's
``mosaic_gpu_sweeps`` builds ``spec.Sweep``s from the op's ``mosaic_gpu.py``
(``autotune_candidates``: block sizes x pipeline depth; its cache key). Winners go to the
autotune cache (``kernels/autotune.py``, keyed by device kind), where the kernels read them at
trace time.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from .. import autotune
from . import spec as specs
from .timing import time_fn


TUNED_IMPLS = ("triton", "mosaic_gpu")


def autotune_op(op: str, dims, dtype, *, impl="triton", cache_path=None, interpret=False,
                max_configs=None, warmup=3, reps=20, log=print, deadline=None) -> dict:
  """Sweep each ``impl`` kernel of ``op`` at ``dims`` and record the winners; returns them.

  ``deadline``: a ``time.perf_counter()`` value after which no further config is tried.
  """
  if impl == "mosaic_gpu":
    return _autotune_sweeps(op, dims, dtype, cache_path=cache_path, interpret=interpret,
                            max_configs=max_configs, warmup=warmup, reps=reps, log=log,
                            deadline=deadline)
  hooks = specs.get(op).tuning_problems
  mod, problems = hooks(dims, dtype, interpret) if hooks is not None else (None, {})
  if mod is None:
    log(f"autotune: no tuning hooks for --op={op}; skipped")
    return {}
  winners = {}
  for kind, (make, inputs) in problems.items():
    cands = mod.candidate_configs(kind, dims, dtype)
    heur = mod.heuristic_config(kind, dims, dtype)
    if heur not in cands:
      cands = [heur] + cands
    if max_configs is not None:
      cands = cands[:max_configs]
    best, best_t, tried = None, float("inf"), 0
    for cfg in cands:
      if deadline is not None and time.perf_counter() > deadline:
        break
      try:
        fn = jax.jit(make(cfg))
        t = statistics.median(time_fn(fn, inputs, warmup=warmup, reps=reps))
      except Exception:  # noqa: BLE001 - configs that fail to compile are skipped
        continue
      tried += 1
      if t < best_t:
        best, best_t = cfg, t
    if best is None:
      log(f"autotune: {op}.{kind} {dims}: no config ran")
      continue
    path = autotune.record(f"{op}.{kind}", dims, dtype, best, path=cache_path,
                           info={"time_s": best_t, "tried": tried})
    winners[kind] = best
    log(f"autotune: {op}.{kind} {'x'.join(map(str, dims))} {jnp.dtype(dtype).name}: "
        f"{best} ({best_t * 1e3:.3f} ms, {tried} configs) -> {path}")
  return winners


def _autotune_sweeps(op, dims, dtype, *, cache_path, interpret, max_configs, warmup, reps, log,
                     deadline) -> dict:
  """The Mosaic GPU sweep: each ``spec.Sweep`` of the op, fastest candidate to the cache."""
  from .. import mosaic_gpu_common
  err = mosaic_gpu_common.version_error()
  if err is not None:
    log(f"autotune: {op} mosaic_gpu skipped: {err}")
    return {}
  hook = specs.get(op).mosaic_gpu_sweeps
  if hook is None:
    log(f"autotune: no mosaic_gpu tuning hooks for --op={op}; skipped")
    return {}
  try:
    sweeps = hook(dims, dtype, interpret)
  except Exception as e:  # noqa: BLE001 - a kernel module still being written, for one
    log(f"autotune: {op} mosaic_gpu at {dims}: cannot build the sweep: {type(e).__name__}: {e}")
    return {}
  winners = {}
  for sw in sweeps:
    cands = list(sw.candidates)[:max_configs] if max_configs is not None else list(sw.candidates)
    best, best_t, tried, failed = None, float("inf"), 0, []
    for cfg in cands:
      if deadline is not None and time.perf_counter() > deadline:
        break
      try:
        t = statistics.median(time_fn(jax.jit(sw.make(cfg)), sw.inputs, warmup=warmup,
                                      reps=reps))
      except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
        failed.append(f"{cfg}: {type(e).__name__}")
        continue
      tried += 1
      if t < best_t:
        best, best_t = cfg, t
    if best is None:
      log(f"autotune: {sw.key} {dims}: no config ran ({len(failed)} failed"
          + (f", first: {failed[0]}" if failed else "") + ")")
      continue
    path = autotune.record(sw.key, sw.dims, dtype, sw.as_dict(best), path=cache_path,
                           info={"time_s": best_t, "tried": tried, "failed": len(failed)})
    winners[sw.key] = sw.as_dict(best)
    log(f"autotune: {sw.key} {'x'.join(map(str, sw.dims))} {jnp.dtype(dtype).name}: "
        f"{sw.as_dict(best)} ({best_t * 1e3:.3f} ms, {tried} configs) -> {path}")
  return winners

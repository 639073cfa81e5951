"""The autotuning sweep: time each candidate launch config of an op's Triton kernels, keep the best.

An op's spec says which kernels to sweep (``OpSpec.tuning_problems``); its ``triton.py``
says which configs to try (``candidate_configs``, ``heuristic_config``). Winners go to the
autotune cache (``kernels/autotune.py``), where the kernels read them at trace time.
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from .. import autotune
from . import spec as specs
from .timing import time_fn


def autotune_op(op: str, dims, dtype, *, cache_path=None, interpret=False, max_configs=None,
                warmup=3, reps=20, log=print) -> dict:
  """Sweep each Triton kernel of ``op`` at ``dims`` and record the winners; returns them."""
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

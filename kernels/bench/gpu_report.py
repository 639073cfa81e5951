"""``python -m kernels.bench gpu_report --out=DIR [--dry_run] [--autotune]``: the one-command GPU
report.

On a GPU, in about 7 minutes on one H200 (``--budget_s``):
  1. measures the device's ceilings: a large bf16 matmul (TFLOP/s) and a copy (GB/s);
  2. optionally (``--autotune``, extra time) sweeps the Triton and Mosaic GPU block configs at
     the report's shapes into the autotune cache first;
  3. for every op x implementation (``xla`` reference, ``triton``, ``mosaic_gpu``; ``cudnn`` for
     attention) checks forward+backward numerics against float32 ``xla`` at a small shape,
     then times each shape and mode of ``gpu_plan.build_plan``;
  4. prints and writes ``DIR/gpu_report.md`` (markdown tables: attention TFLOP/s, the
     memory-bound ops' GB/s, each with % of the measured ceiling) and ``DIR/gpu_report.jsonl``
     (one line per cell, written as it is measured, so a killed run keeps what it had).
A cell that fails (compile error, OOM, numerics) says so and the report goes on; cells past an
op's share of the time budget say ``skip (time)``. Long sequences run fewer repetitions: each
cell times batches of calls for about ``--cell_s`` seconds.

``--dry_run`` (CPU, CI): ``gpu_dry_run.py``: the plan, plus lowering and interpret checks.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp

from . import gpu_measure as gm, gpu_plan, gpu_tables
from .gpu_measure import DTYPE
from .gpu_plan import Entry

# Share of each group's budget for compiling it, before its cells are timed.
COMPILE_SHARE = 0.7


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m kernels.bench gpu_report",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for gpu_report.md/.jsonl (or the plan)")
  p.add_argument("--dry_run", action="store_true",
                 help="no GPU: print and write the plan, lower the Pallas kernels for cuda and "
                      "run Mosaic GPU interpret numerics at tiny shapes")
  p.add_argument("--ops", default=",".join(gpu_plan.OPS), help="comma-separated ops")
  p.add_argument("--budget_s", type=float, default=400.0,
                 help="seconds for the checks and timings (ceilings and autotuning excluded)")
  p.add_argument("--cell_s", type=float, default=0.1, help="timed seconds per batch of calls")
  p.add_argument("--compile_workers", type=int, default=8,
                 help="threads compiling a group's cells before it is timed (0: compile each "
                      "cell in the main thread when it is reached)")
  p.add_argument("--autotune", action="store_true",
                 help="tune Triton and Mosaic GPU configs at the report's shapes first")
  p.add_argument("--autotune_budget_s", type=float, default=300.0)
  p.add_argument("--cache", default=None, help="autotune cache file (default: the user cache)")
  p.add_argument("--max_configs", type=int, default=None, help="autotune: configs per kernel")
  # Dry-run knobs (CI keeps them small).
  p.add_argument("--check_ops", default=None,
                 help="dry run: ops to lower/interpret (default: --ops)")
  p.add_argument("--no_interpret", action="store_true", help="dry run: skip interpret numerics")
  p.add_argument("--interpret_budget_s", type=float, default=60.0,
                 help="dry run: seconds for interpret numerics (later ones are skipped)")
  return p


def env_header() -> list[str]:
  d = jax.devices()[0]
  try:
    import jaxlib
    jaxlib_v = jaxlib.__version__
  except Exception:  # noqa: BLE001
    jaxlib_v = "?"
  pv = getattr(getattr(d, "client", None), "platform_version", "")
  return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
          f"jax {jax.__version__}, jaxlib {jaxlib_v}, python {platform.python_version()}",
          f"device: {d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))"
          + (f", {pv}" if pv else ""), f"dtype: {jnp.dtype(DTYPE).name}"]


def measure_ceilings(log=print) -> dict:
  """Measured bf16 matmul TFLOP/s (best of n = 8192, 16384) and copy GB/s (1 GiB read and
  written): the report's %peak is of these, not of datasheet numbers."""
  k1, k2 = jax.random.split(jax.random.key(0))
  best = 0.0
  for n in (8192, 16384):
    a = jax.random.normal(k1, (n, n), DTYPE)
    b = jax.random.normal(k2, (n, n), DTYPE)
    t, _ = gm.time_batched(jax.jit(lambda p, q: p @ q), (a, b), cell_s=0.2, max_n=20)
    best = max(best, 2 * n ** 3 / t / 1e12)
    log(f"# matmul {n}^3 bf16: {2 * n ** 3 / t / 1e12:.1f} TFLOP/s")
    del a, b
  x = jnp.arange((1 << 30) // 4, dtype=jnp.float32)
  t, _ = gm.time_batched(jax.jit(lambda a: a * 1.0001), (x,), cell_s=0.2, max_n=16)
  gbps = 2 * x.nbytes / t / 1e9
  log(f"# copy 1 GiB: {gbps:.0f} GB/s")
  return {"matmul_tflops": best, "copy_gbps": gbps}


def _order(entries: list[Entry]) -> list[Entry]:
  """Measuring order: smallest problems first across every mode and variant, so a budget cut
  drops the longest sequences / largest shapes, not a whole mode."""
  if entries and entries[0].op == "attention":
    return sorted(entries, key=lambda e: (e.dims[1], e.mode, e.dims[3], e.causal))
  index = {d: i for i, d in enumerate(gpu_plan.MEMORY_SHAPES[entries[0].op])} if entries else {}
  return sorted(entries, key=lambda e: (index[e.dims], e.mode))


def autotune_all(plan: list[Entry], args, log=print) -> None:
  """Sweep the Triton and Mosaic GPU kernels at every shape of the plan within
  ``--autotune_budget_s``: the memory-bound ops first (quick), then attention (each (seq, head
  dim), causal; its sweeps are long)."""
  from .tune import autotune_op
  deadline = time.perf_counter() + args.autotune_budget_s
  seen = set()
  for e in sorted(plan, key=lambda e: e.op == "attention"):
    spec = e.spec()
    hook = spec.tuning_problems if e.impl == "triton" else spec.mosaic_gpu_sweeps
    key = (e.op, e.impl, e.dims)
    if e.impl not in ("triton", "mosaic_gpu") or hook is None or key in seen:
      continue
    seen.add(key)
    if gpu_plan.unavailable_reason(e.op, e.impl, "gpu") is not None:
      continue
    if time.perf_counter() > deadline:
      log(f"# autotune: budget spent; {e.op} {e.impl} {e.shape} and later not tuned")
      break
    try:
      autotune_op(e.op, e.dims, DTYPE, impl=e.impl, cache_path=args.cache,
                  max_configs=args.max_configs, warmup=1, reps=5, log=log, deadline=deadline)
    except Exception as ex:  # noqa: BLE001 - tuning is best effort
      log(f"# autotune: {e.op} {e.impl} {e.shape}: {gm.short(ex)}")


def _groups(plan: list[Entry]) -> list[tuple[str, list[Entry]]]:
  """Measuring groups: every op's established implementations first, then the Mosaic GPU
  cells of every op, so a new kernel that takes the GPU down (an illegal address poisons the
  process's CUDA context) comes after everything else is measured."""
  ops = list(dict.fromkeys(e.op for e in plan))
  out = [(op, [e for e in plan if e.op == op and e.impl != "mosaic_gpu"]) for op in ops]
  out += [(f"{op} mosaic_gpu", [e for e in plan if e.op == op and e.impl == "mosaic_gpu"])
          for op in ops]
  return [(g, _order(es)) for g, es in out if es]


def _weight(entries: list[Entry]) -> float:
  op = entries[0].op
  n_impls = len(gpu_plan.ATTN_IMPLS if op == "attention" else gpu_plan.GPU_IMPLS)
  return gpu_plan.WEIGHTS.get(op, 1.0) * len({e.impl for e in entries}) / n_impls


def run_gpu(plan: list[Entry], out: pathlib.Path, args, header: list[str]) -> int:
  start = time.perf_counter()
  jsonl, md = out / "gpu_report.jsonl", out / "gpu_report.md"
  jsonl.write_text("")
  ceilings = measure_ceilings()
  if args.autotune:
    autotune_all(plan, args)
  deadline = time.perf_counter() + args.budget_s
  groups = _groups(plan)
  compiler = gm.Compiler(args.compile_workers)
  jobs, check_jobs, checks = {}, {}, {}
  cells, row_key, row_args = {}, None, None
  try:
    for i, (g, entries) in enumerate(groups):
      weights = [_weight(es) for _, es in groups[i:]]
      budget = max(0.0, deadline - time.perf_counter()) * weights[0] / sum(weights)
      compiler.deadlines[g] = g_deadline = time.perf_counter() + budget
      print(f"# {g}: {len(entries)} cells, {budget:.0f} s", flush=True)
      _compile_group(g, entries, compiler, jobs, check_jobs, time.perf_counter() + COMPILE_SHARE
                     * budget)
      for e in entries:
        cell = _measure(e, jobs, check_jobs, checks, compiler, g, g_deadline)
        if "compiled" in cell:
          key = (e.op, e.mode, e.dims, e.causal)
          if key != row_key:  # one set of inputs per row, shared by its implementations
            row_key, row_args = key, None
            try:
              row_args = gm.make_inputs(e)
            except Exception as ex:  # noqa: BLE001 - OOM making inputs
              row_key = None
              cell.update(status="error", error=gm.short(ex))
          if row_args is not None:
            compiled, compile_s = cell.pop("compiled")
            cell.update(gm.time_cell(e, compiled, row_args, ceilings, args.cell_s),
                        compile_s=compile_s)
        cell.pop("compiled", None)
        jobs.pop(e, None)
        cells[e] = cell
        rec = {"op": e.op, "impl": e.impl, "mode": e.mode, "shape": e.shape,
               "dims": list(e.dims), "causal": e.causal, "variant": e.variant,
               "metric": e.metric, **cell, "elapsed_s": time.perf_counter() - start}
        with jsonl.open("a") as f:
          f.write(json.dumps(rec, default=float) + "\n")
        print(f"[{time.perf_counter() - start:6.1f}s] {e.label()}: "
              f"{gpu_tables.cell_text(e, cell, full=True)}", flush=True)
      md.write_text("\n".join(gpu_tables.report_markdown(plan, cells, checks, ceilings,
                                                          header)) + "\n")
  finally:
    compiler.shutdown()
  text = "\n".join(gpu_tables.report_markdown(plan, cells, checks, ceilings, header))
  md.write_text(text + "\n")
  print(text)
  print(f"# wrote {md} and {jsonl} in {time.perf_counter() - start:.0f} s")
  return 0


def _compile_group(g, entries, compiler, jobs, check_jobs, until: float) -> None:
  """Compile a group's cells and checks (in parallel) before timing any of them: XLA's GPU
  compiler runs autotuning kernels on the device, which must not overlap a timed cell. What is
  not compiled by ``until`` is waited for cell by cell (up to the group's deadline)."""
  futures = []
  for e in entries:
    if gpu_plan.unavailable_reason(e.op, e.impl, "gpu") is not None:
      continue
    small = dataclasses.replace(gpu_plan.small_entry(e), mode="fwd_bwd")
    if small not in check_jobs:  # the check compiles just before its first cell
      check_jobs[small] = compiler.submit(g, gm.compile_check, small)
      futures.append(check_jobs[small])
    jobs[e] = compiler.submit(g, gm.compile_cell, e)
    futures.append(jobs[e])
  t0 = time.perf_counter()
  if compiler.pool is not None:
    done, _ = concurrent.futures.wait(futures, timeout=max(0.0, until - time.perf_counter()))
    n_done = len(done)
  else:
    n_done = 0
    for f in futures:  # compiling in this thread: stop at ``until``
      if time.perf_counter() > until:
        break
      n_done += 1
      try:
        f.result()
      except Exception:  # noqa: BLE001 - raised again where the cell reads it
        pass
  print(f"# {g}: compiled {n_done} of {len(futures)} kernels and checks in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)


def _wait(job, g_deadline):
  """A compile job's result, waiting at most until the group's deadline (None: skipped)."""
  return job.result(timeout=max(1.0, g_deadline - time.perf_counter()))


def _measure(e, jobs, check_jobs, checks, compiler, g, g_deadline) -> dict:
  """The cell's status before timing: n/a, skip, error, or ``compiled`` plus its check."""
  why = gpu_plan.unavailable_reason(e.op, e.impl, "gpu")
  if why is not None:
    return {"status": "n/a", "error": why}
  if time.perf_counter() > g_deadline:
    return {"status": "skip", "error": "time budget"}
  ck = (e.op, e.impl, e.variant, e.mode)
  if ck not in checks:  # the fwd+bwd check covers the forward unless it errors
    ck2 = ck[:3] + ("fwd_bwd",)
    if ck2 not in checks:
      small = dataclasses.replace(gpu_plan.small_entry(e), mode="fwd_bwd")
      checks[ck2] = _check(small, check_jobs[small], g_deadline)
    checks[ck] = checks[ck2]
    if e.mode == "fwd" and checks[ck2]["check"] == "error":
      small = gpu_plan.small_entry(e)
      checks[ck] = _check(small, compiler.submit(g, gm.compile_check, small), g_deadline)
  cell = {k: v for k, v in checks[ck].items() if k != "error"}
  if checks[ck].get("error"):
    cell["check_error"] = checks[ck]["error"]
  try:
    compiled = _wait(jobs[e], g_deadline)
  except concurrent.futures.TimeoutError:
    return dict(cell, status="skip", error="time budget (still compiling)")
  except Exception as ex:  # noqa: BLE001 - a compile error is the cell's result
    return dict(cell, status="error", error=gm.short(ex))
  if compiled is None:
    return dict(cell, status="skip", error="time budget")
  return dict(cell, compiled=compiled)


def _check(small, job, g_deadline) -> dict:
  try:
    compiled = _wait(job, g_deadline)
    if compiled is None:
      return {"check": "skip", "error": "time budget"}
    return gm.run_check(small, compiled)
  except concurrent.futures.TimeoutError:
    return {"check": "skip", "error": "time budget (still compiling)"}
  except Exception as ex:  # noqa: BLE001 - an implementation that fails says why
    return {"check": "error", "error": gm.short(ex)}


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  ops = [o.strip() for o in args.ops.split(",") if o.strip()]
  checks = [o.strip() for o in (args.check_ops or "").split(",") if o.strip()]
  bad = [o for o in ops + checks if o not in gpu_plan.OPS]
  if bad:
    parser().error(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(gpu_plan.OPS)}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  header = env_header()
  for line in header:
    print(f"# {line}")
  plan = gpu_plan.build_plan(ops)
  if args.dry_run:
    from . import gpu_dry_run
    return gpu_dry_run.run(plan, out, args, header)
  if jax.default_backend() != "gpu":
    print(f"gpu_report: needs a GPU (backend is {jax.default_backend()}); use --dry_run for "
          "the plan and the lowering checks", file=sys.stderr)
    return 2
  return run_gpu(plan, out, args, header)

"""``python -m kernels.bench gpu_report --dry_run``: what the GPU report would measure, checked on
a CPU.

It prints and writes (``DIR/gpu_report_plan.md``, ``DIR/gpu_report_plan.jsonl``) the plan, every
op x implementation x shape x mode, then for the Pallas kernels the two checks a CPU can do
(``shared/FACTS-mosaic-gpu.md``):
  * lowering, at one representative shape per op and mode: ``mosaic_gpu`` through
    ``mosaic_gpu_common.export_for_cuda`` (the real Mosaic GPU lowering: layout inference,
    shared-memory budget) with the kernels' threads, shared memory, wgmma shapes and TMA copies
    read back by ``exported_kernels``; ``triton`` through ``triton_common.lower_for_cuda``;
  * numerics of ``mosaic_gpu`` forward+backward at a tiny shape in Pallas's GPU interpreter,
    against float32 ``xla`` (``--interpret_budget_s`` caps it; ``--no_interpret`` skips it).
On JAX < 0.11 the plan is listed all the same and the Mosaic GPU rows say they need 0.11.
Failures are rows, not crashes: the exit status is 0 unless the tool itself breaks.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax

from . import gpu_measure as gm, gpu_plan
from .gpu_plan import Entry

LOWER_IMPLS = ("triton", "mosaic_gpu")
# The lowering checks' attention shape: seq 2048, head dim 128 (grid size barely matters).
LOWER_ATTN = (2048, 128)
# The pretend GPU the kernels are lowered for (tuning reads its kind; no compute capability).
DEVICE_KIND, NUM_CORES = "NVIDIA H200", 132


def _abstract_mesh():
  from jax.sharding import AbstractDevice, AbstractMesh
  device = AbstractDevice(device_kind=DEVICE_KIND, num_cores=NUM_CORES, platform="gpu")
  return AbstractMesh((1,), ("x",), abstract_device=device)


def lower_entry(e: Entry) -> dict:
  """Lower one cell for cuda; a dict of what came out (or ``error``)."""
  from .. import platforms
  why = gpu_plan.unavailable_reason(e.op, e.impl, "gpu")
  if why is not None:
    return {"status": "n/a", "error": why}
  t0 = time.perf_counter()
  try:
    fn, args = gm.abstract_call(e)
    with platforms.target_platform("gpu"):
      if e.impl == "triton":
        from ..triton_common import TRITON_CUSTOM_CALL, lower_for_cuda
        text = lower_for_cuda(fn, *args, device_kind=DEVICE_KIND, num_cores=NUM_CORES)
        res = {"triton_calls": text.count(TRITON_CUSTOM_CALL)}
      else:
        from jax.sharding import use_abstract_mesh
        from .. import mosaic_gpu_common as mgc
        with use_abstract_mesh(_abstract_mesh()):
          kernels = mgc.exported_kernels(mgc.export_for_cuda(fn, *args))
        res = {"kernels": len(kernels), "threads": [k.threads for k in kernels],
               "smem_bytes": [k.smem_bytes for k in kernels],
               "wgmma": sorted({s for k in kernels for s in k.wgmma_shapes}),
               "tma_copies": [k.tma_copies for k in kernels]}
  except Exception as ex:  # noqa: BLE001 - a kernel that does not lower is a row
    msg = str(ex).strip().splitlines()
    return {"status": "error", "error": f"{type(ex).__name__}: {msg[0][:200] if msg else ''}",
            "seconds": time.perf_counter() - t0}
  ok = res.get("triton_calls", res.get("kernels", 0)) > 0
  res.update(status="ok" if ok else "error", seconds=time.perf_counter() - t0)
  if not ok:
    res["error"] = "no kernel in the lowered module"
  return res


def lower_entries(ops) -> list[Entry]:
  out = []
  for op in ops:
    for mode in gpu_plan.MODES:
      if op == "attention":
        out += [Entry(op, impl, mode, gpu_plan.attention_dims(*LOWER_ATTN), causal)
                for causal in (True, False) for impl in LOWER_IMPLS]
      else:
        out += [Entry(op, impl, mode, gpu_plan.MEMORY_SHAPES[op][0]) for impl in LOWER_IMPLS]
  return out


def interpret_entries(ops) -> list[Entry]:
  """Tiny forward+backward cells for Pallas's GPU interpreter (attention: causal and not)."""
  out = []
  for op in ops:
    dims = gpu_plan.INTERPRET_SHAPES[op]
    causals = (True, False) if op == "attention" else (None,)
    out += [Entry(op, "mosaic_gpu", "fwd_bwd", dims, c) for c in causals]
  return out


def _lower_cols(r: dict) -> str:
  if r["status"] != "ok":
    return f"{r['status']}: {r.get('error', '')}"
  if "triton_calls" in r:
    return f"ok: {r['triton_calls']} Triton custom call(s)"
  return ("ok: {k} kernel(s); threads {t}; smem {s} B; wgmma {w}; TMA {m}".format(
      k=r["kernels"], t=r["threads"], s=r["smem_bytes"], w=", ".join(r["wgmma"]) or "-",
      m=r["tma_copies"]))


def run(plan: list[Entry], out, args, header: list[str]) -> int:
  start = time.perf_counter()
  check_ops = ([o.strip() for o in args.check_ops.split(",") if o.strip()]
               if args.check_ops is not None else sorted({e.op for e in plan},
                                                         key=gpu_plan.OPS.index))
  from .. import mosaic_gpu_common
  gate = mosaic_gpu_common.version_error()
  lines = ["# GPU report plan (`python -m kernels.bench gpu_report --dry_run`)", ""]
  lines += [f"- {h}" for h in header]
  lines += ["- the GPU run: ceilings (bf16 matmul, copy) ~10 s, then numerics + timings "
            f"within --budget_s (default 400 s; attention {gpu_plan_share():.0%}), "
            "< 8 min on one H200 with startup", ""]
  if gate is not None:
    lines += [f"**Mosaic GPU rows need JAX >= 0.11: this is JAX {jax.__version__}.** They are "
              "listed below; a GPU run with this JAX reports them as n/a.", ""]
  lines += gpu_plan.plan_summary(plan) + [""]
  for line in lines:
    print(line)

  records = []
  low = []
  print(f"## lowering for cuda ({len(lower_entries(check_ops))} checks)", flush=True)
  for e in lower_entries(check_ops):
    r = lower_entry(e)
    records.append({"kind": "lower", "op": e.op, "impl": e.impl, "mode": e.mode,
                    "shape": e.shape, "variant": e.variant, **r})
    low.append(f"| {e.op} | {e.mode} | {e.variant or '-'} | {e.shape} | {e.impl} | "
               f"{_lower_cols(r)} | {r.get('seconds', 0):.1f} |")
    print(low[-1], flush=True)

  interp = []
  if not args.no_interpret:
    deadline = time.perf_counter() + args.interpret_budget_s
    print("## Mosaic GPU interpret numerics (tiny shapes, fwd+bwd vs float32 xla)", flush=True)
    for e in interpret_entries(check_ops):
      why = gpu_plan.unavailable_reason(e.op, e.impl, "gpu")
      t0 = time.perf_counter()
      if why is not None:
        r = {"check": "n/a", "error": why}
      elif time.perf_counter() > deadline:
        r = {"check": "skip", "error": f"--interpret_budget_s {args.interpret_budget_s:.0f} spent"}
      else:
        r = gm.check_numerics(e, interpret=True)
      r["seconds"] = time.perf_counter() - t0
      records.append({"kind": "interpret", "op": e.op, "impl": e.impl, "mode": e.mode,
                      "shape": e.shape, "variant": e.variant, **r})
      err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
      interp.append(f"| {e.op} | {e.variant or '-'} | {e.shape} | {err} | {r['check']} | "
                    f"{r.get('error', '')} | {r['seconds']:.1f} |")
      print(interp[-1], flush=True)

  plan_md = gpu_plan.plan_markdown(plan, "gpu")
  print("## plan")
  for line in plan_md:
    print(line)
  doc = lines + ["## lowering for cuda (one representative shape per op and mode)", "",
                 "| op | mode | variant | shape | impl | result | s |",
                 "|---|---|---|---|---|---|---|"]
  doc += low + [""]
  if interp:
    doc += ["## Mosaic GPU numerics in Pallas's GPU interpreter (tiny shapes)", "",
            "| op | variant | shape | rel err | check | note | s |",
            "|---|---|---|---|---|---|---|"]
    doc += interp + [""]
  doc += ["## plan", ""] + plan_md + [""]
  (out / "gpu_report_plan.md").write_text("\n".join(doc) + "\n")
  with (out / "gpu_report_plan.jsonl").open("w") as f:
    for e in plan:
      f.write(json.dumps({"plan": True, **dataclasses.asdict(e), "shape": e.shape,
                          "variant": e.variant, "metric": e.metric}) + "\n")
    for r in records:
      f.write(json.dumps(r, default=float) + "\n")
  n_low_bad = sum(1 for r in records if r["kind"] == "lower" and r["status"] == "error")
  print(f"# dry run: {len(plan)} planned cells, {len(low)} lowering checks ({n_low_bad} failed), "
        f"{len(interp)} interpret checks, {time.perf_counter() - start:.0f} s; wrote "
        f"{out / 'gpu_report_plan.md'}")
  return 0


def gpu_plan_share() -> float:
  w = gpu_plan.WEIGHTS
  return w["attention"] / (w["attention"] + len(gpu_plan.MEMORY_SHAPES))

"""The GPU report's markdown: attention TFLOP/s, the memory-bound ops' GB/s, the numerics checks.

Cells are ``value (percent of the measured ceiling)``: attention and cross-entropy TFLOP/s of the
bf16 matmul peak, softmax and the norms GB/s of the copy bandwidth. A cell that did not run
shows a numbered note (``err[2]``, ``n/a[1]``) whose text is listed under the tables; ``!num``
marks a cell whose implementation failed the numerics check.
"""
from __future__ import annotations

from . import gpu_plan
from .gpu_plan import Entry


def cell_text(e: Entry, cell: dict | None, *, full: bool = False, notes: dict | None = None) -> str:
  """One cell: the metric and %, or why there is none (``full``: the reason itself)."""
  if cell is None:
    return "-"
  if cell["status"] != "ok":
    tag = {"error": "err", "n/a": "n/a", "skip": "skip"}[cell["status"]]
    if full or notes is None:
      return f"{tag}: {cell.get('error', '')}"
    if cell["status"] == "skip":
      return "skip (time)"
    n = notes.setdefault(cell.get("error", ""), len(notes) + 1)
    return f"{tag}[{n}]"
  if e.op == "attention":
    text = f"{cell['tflops']:.1f} ({cell['pct_matmul']:.0f}%)"
  elif e.op == "linear_cross_entropy":
    text = f"{cell['gbps']:.0f} GB/s, {cell['tflops']:.1f} TF/s ({cell['pct_matmul']:.0f}%)"
  else:
    text = f"{cell['gbps']:.0f} ({cell['pct_copy']:.0f}%)"
  if cell.get("check") == "FAIL":
    text += " !num"
  if full:
    text += f", {cell['median_s'] * 1e3:.3f} ms, compile {cell['compile_s']:.1f} s"
    if cell.get("check") not in (None, "pass"):
      text += f", numerics {cell.get('check')}"
  return text


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def _derived_bwd(fwd: dict | None, both: dict | None, peak: float) -> str:
  """Backward alone: (fwd+bwd FLOPs - fwd FLOPs) / (fwd+bwd time - fwd time)."""
  if not fwd or not both or fwd.get("status") != "ok" or both.get("status") != "ok":
    return "-"
  dt = both["median_s"] - fwd["median_s"]
  if dt <= 0:
    return "-"
  tf = (both["flops"] - fwd["flops"]) / dt / 1e12
  return f"{tf:.1f} ({100 * tf / peak:.0f}%)"


def attention_tables(plan, cells, notes, peak: float) -> list[str]:
  out = []
  entries = [e for e in plan if e.op == "attention"]
  if not entries:
    return out
  rows: dict = {}
  for e in entries:
    rows.setdefault((e.dims[3], e.causal, e.dims[1], e.shape), {})[(e.mode, e.impl)] = e
  titles = {"fwd": "forward", "fwd_bwd": "forward + backward",
            "bwd": "backward alone (derived: fwd+bwd minus fwd, time and FLOPs)"}
  for mode in gpu_plan.MODES + ("bwd",):
    out += [f"### attention {titles[mode]}: TFLOP/s (% of measured bf16 matmul peak)", ""]
    body = []
    for (hd, causal, seq, shape), per in rows.items():
      line = [str(seq), str(hd), "causal" if causal else "full", shape]
      for impl in gpu_plan.ATTN_IMPLS:
        if mode == "bwd":
          pair = [cells.get(per.get((m, impl))) for m in gpu_plan.MODES]
          line.append(_derived_bwd(*pair, peak))
        else:
          e = per.get((mode, impl))
          line.append(cell_text(e, cells.get(e), notes=notes) if e else "-")
      body.append(line)
    out += _table(["seq", "hd", "mask", "BxTxHxD"] + list(gpu_plan.ATTN_IMPLS), body) + [""]
  return out


def memory_tables(plan, cells, notes) -> list[str]:
  out = []
  for title, ops in (("softmax, layer norm, RMS norm: GB/s (% of measured copy bandwidth)",
                      ("softmax", "layer_norm", "rms_norm")),
                     ("linear cross-entropy: GB/s, TFLOP/s (% of measured bf16 matmul peak)",
                      ("linear_cross_entropy",))):
    rows: dict = {}
    for e in plan:
      if e.op in ops:
        rows.setdefault((e.op, e.mode, e.shape), {})[e.impl] = e
    if not rows:
      continue
    body = [[op, mode, shape] + [cell_text(per[i], cells.get(per[i]), notes=notes)
                                 if i in per else "-" for i in gpu_plan.GPU_IMPLS]
            for (op, mode, shape), per in rows.items()]
    out += [f"### {title}", ""] + _table(["op", "mode", "shape"] + list(gpu_plan.GPU_IMPLS),
                                         body) + [""]
  return out


def checks_table(checks: dict, notes: dict) -> list[str]:
  body = []
  for (op, impl, variant, mode), c in sorted(checks.items(), key=lambda kv: tuple(map(str, kv[0]))):
    if mode == "fwd" and c is checks.get((op, impl, variant, "fwd_bwd")):
      continue  # the forward shares the fwd+bwd check
    err = f"{c['rel_err']:.2e}" if "rel_err" in c else "-"
    base = f"{c['xla_bf16_rel_err']:.2e}" if "xla_bf16_rel_err" in c else "-"
    verdict = c["check"]
    if c.get("error"):
      verdict += f"[{notes.setdefault(c['error'], len(notes) + 1)}]"
    body.append([op, variant or "-", mode, impl, err, base, verdict])
  if not body:
    return []
  return (["### numerics at small shapes (vs float32 xla; max error / max |reference|)", ""]
          + _table(["op", "variant", "mode", "impl", "rel err", "xla bf16 rel err", "check"],
                   body) + [""])


def report_markdown(plan, cells, checks, ceilings, header) -> list[str]:
  notes: dict = {}
  out = ["# GPU kernel report (`python -m kernels.bench gpu_report`)", ""]
  out += [f"- {h}" for h in header]
  out += [f"- measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.1f} TFLOP/s, copy "
          f"{ceilings['copy_gbps']:.0f} GB/s", ""]
  done = sum(1 for c in cells.values() if c["status"] == "ok")
  out += [f"{done} of {len(plan)} cells measured.", ""]
  out += attention_tables(plan, cells, notes, ceilings["matmul_tflops"])
  out += memory_tables(plan, cells, notes)
  out += checks_table(checks, notes)
  if notes:
    out += ["### notes", ""] + [f"{n}. {text}" for text, n in notes.items()] + [""]
  return out

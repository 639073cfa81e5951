"""Output of the bench tool: the text table, JSON lines, and a throughput plot.

Rows are the dicts ``timing.bench_one`` returns; a row with ``error`` prints its reason in
place of the numbers.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from .. import autotune
from . import spec as specs


def fmt_bytes(b) -> str:
  """Bytes as MiB with one decimal; ``-`` when unknown."""
  return "-" if b is None else f"{b / 2**20:.1f}"


def format_table(rows: Sequence[dict]) -> str:
  head = ["op", "impl", "shape", "dtype", "mode", "median ms", "TFLOP/s", "GB/s", "%peak",
          "rel err", "temp MiB", "peak MiB", "note"]
  lines = []
  for r in rows:
    if "error" in r:
      lines.append([r["op"], r["impl"], r["dims"], r["dtype"], r["mode"]] + ["-"] * 7
                   + [r["error"]])
      continue
    pct = f"{r['pct_peak']:.1f} {r['bound'][:3]}" if "pct_peak" in r else "-"
    note = "interpret (not a kernel timing)" if r["interpret"] else (
        "XLA:CPU" if r["platform"] == "cpu" else "")
    lines.append([r["op"], r["impl"], r["dims"], r["dtype"], r["mode"],
                  f"{r['median_s'] * 1e3:.3f}", f"{r['tflops']:.3f}", f"{r['gbps']:.1f}", pct,
                  f"{r['max_rel_err']:.2e}", fmt_bytes(r["temp_bytes"]),
                  fmt_bytes(r["peak_bytes_in_use"]), note])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def write_json(rows: Sequence[dict], path: str) -> None:
  """Appends the rows as JSON lines to ``path`` (``-``: stdout)."""
  text = "\n".join(json.dumps(r, default=float) for r in rows) + "\n"
  if path == "-":
    sys.stdout.write(text)
  else:
    with open(path, "a") as f:
      f.write(text)


def _groups(rows):
  out: dict[tuple, list] = {}
  for r in rows:
    out.setdefault((r["op"], r["impl"], r["mode"]), []).append(r)
  return out


def plot(rows: Sequence[dict], path: str) -> None:
  """A PNG of throughput (GB/s for memory-bound ops, else TFLOP/s) against problem size."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                       "(or the project's 'experiments' extra)") from e
  ok = [r for r in rows if "error" not in r]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (op, impl, mode), group in _groups(ok).items():
    spec = specs.get(op)
    group.sort(key=lambda r: spec.size(tuple(r["shape"])))
    metric = "gbps" if spec.memory_bound else "tflops"
    interp = " (interpret)" if group[0]["interpret"] else ""
    ax.plot([spec.size(tuple(r["shape"])) for r in group], [r[metric] for r in group],
            marker="o", label=f"{op} {impl}{interp} {mode}")
  ax.set_xscale("log")
  ops = sorted({r["op"] for r in ok})
  ax.set_xlabel("problem size: " + "; ".join(f"{o} {specs.get(o).size_doc}" for o in ops))
  memory = all(specs.get(r["op"]).memory_bound for r in ok) if ok else True
  ax.set_ylabel("GB/s" if memory else "TFLOP/s")
  ax.set_title(f"kernels.bench on {autotune.device_kind()}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

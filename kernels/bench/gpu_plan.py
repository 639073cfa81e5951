"""What ``python -m kernels.bench gpu_report`` measures: the plan of op x implementation x shape x
mode, and whether each implementation can run with this JAX.

The plan is the same on every machine; ``--dry_run`` prints it (and writes it) without a GPU.
Attention keeps the work per row meaningful the FlashAttention way: a fixed token budget
(``batch = ATTN_TOKENS / seq``) and a fixed width (``heads = ATTN_HIDDEN / head_dim``), so the
FLOPs grow linearly with the sequence. The memory-bound ops use shapes of >= 32M elements, so
one call moves >= 128 MB and launch overhead stays small against HBM time.
"""
from __future__ import annotations

import dataclasses
import importlib

import jax

from . import spec as specs

ATTN_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
ATTN_HEAD_DIMS = (64, 128)
ATTN_TOKENS = 16384   # batch * seq per row
ATTN_HIDDEN = 2048    # heads * head_dim per row
MODES = ("fwd", "fwd_bwd")
# The GPU implementations compared, in table order (attention adds cuDNN); "xla" is the reference.
GPU_IMPLS = ("xla", "triton", "mosaic_gpu")
ATTN_IMPLS = ("xla", "cudnn", "triton", "mosaic_gpu")
# Share of the GPU run's budget per op (unused time passes on); other ops weigh 1.
WEIGHTS = {"attention": 6.0}
MEMORY_SHAPES = {
    "softmax": ((32768, 1024), (8192, 8192), (4096, 50257)),
    "layer_norm": ((32768, 1024), (16384, 4096), (8192, 12288)),
    "rms_norm": ((32768, 1024), (16384, 4096), (8192, 12288)),
    # Linear cross-entropy is a [N, D] @ [D, V] matmul plus a row reduction: GB/s and TFLOP/s.
    "linear_cross_entropy": ((8192, 1024, 32768), (16384, 2048, 50257)),
}
OPS = ("attention",) + tuple(MEMORY_SHAPES)
# Small shapes for the numerics check on a GPU (forward and backward against float32 "xla").
CHECK_SHAPES = {"softmax": (256, 1024), "layer_norm": (256, 1024), "rms_norm": (256, 1024),
                "linear_cross_entropy": (256, 256, 2048)}
CHECK_ATTN = (1, 256, 2)  # batch, seq, heads; head dim from the row
# Tiny shapes for the CPU dry run's interpret-mode numerics (Pallas's GPU interpreter is slow).
INTERPRET_SHAPES = {"softmax": (64, 256), "layer_norm": (64, 256), "rms_norm": (64, 256),
                    "linear_cross_entropy": (64, 64, 256), "attention": (1, 128, 1, 64)}
# The op package that registers each op's implementations.
PACKAGES = {"attention": "attention", "softmax": "softmax", "layer_norm": "norms",
            "rms_norm": "norms", "linear_cross_entropy": "cross_entropy"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One cell of the report: an implementation of an op at one shape and mode."""
  op: str
  impl: str
  mode: str
  dims: tuple
  causal: bool | None = None  # attention only

  @property
  def metric(self) -> str:
    if self.op == "attention":
      return "TFLOP/s"
    return "GB/s+TFLOP/s" if self.op == "linear_cross_entropy" else "GB/s"

  @property
  def variant(self) -> str:
    """The row label beside the shape: attention's masking and head dim."""
    if self.op != "attention":
      return ""
    return f"{'causal' if self.causal else 'full'} hd{self.dims[3]}"

  @property
  def shape(self) -> str:
    return "x".join(map(str, self.dims))

  def spec(self) -> specs.OpSpec:
    """The op's bench spec (attention: with this row's masking)."""
    if self.op == "attention":
      from ..attention import bench_spec
      return bench_spec.with_causal(bool(self.causal))
    return specs.get(self.op)

  def with_dims(self, dims) -> "Entry":
    return dataclasses.replace(self, dims=tuple(dims))

  def label(self) -> str:
    v = f" {self.variant}" if self.variant else ""
    return f"{self.op} {self.mode}{v} {self.shape} {self.impl}"


def attention_dims(seq: int, head_dim: int) -> tuple:
  return (max(1, ATTN_TOKENS // seq), seq, max(1, ATTN_HIDDEN // head_dim), head_dim)


def build_plan(ops=OPS) -> list[Entry]:
  """Every cell, grouped by op, mode and row (the implementations of a row are adjacent)."""
  plan = []
  for op in ops:
    for mode in MODES:
      if op == "attention":
        for hd in ATTN_HEAD_DIMS:
          for causal in (False, True):
            for seq in ATTN_SEQS:
              plan += [Entry(op, impl, mode, attention_dims(seq, hd), causal)
                       for impl in ATTN_IMPLS]
      else:
        for dims in MEMORY_SHAPES[op]:
          plan += [Entry(op, impl, mode, dims) for impl in GPU_IMPLS]
  return plan


def small_entry(e: Entry) -> Entry:
  """The row's numerics-check twin (a small shape, same op, implementation, mode, masking)."""
  if e.op == "attention":
    return e.with_dims(CHECK_ATTN + (e.dims[3],))
  return e.with_dims(CHECK_SHAPES[e.op])


def registered(op: str) -> tuple[str, ...]:
  """The implementation names op's package registers (its ``IMPLEMENTATIONS``)."""
  pkg = importlib.import_module(f"..{PACKAGES[op]}", __package__)
  return tuple(pkg.IMPLEMENTATIONS)


def unavailable_reason(op: str, impl: str, platform: str) -> str | None:
  """Why ``impl`` of ``op`` cannot run on ``platform`` with this JAX, or None.

  ``platform``: where the cell would run (the report and the dry run both ask about "gpu";
  elsewhere cuDNN is unavailable). The Mosaic GPU rows also need JAX >= 0.11 and the op's
  module to import (it may be missing or broken while it is written): the reason says which.
  """
  if impl == "mosaic_gpu":
    from .. import mosaic_gpu_common
    if mosaic_gpu_common.version_error() is not None:
      return f"Mosaic GPU rows need JAX >= 0.11 (this is JAX {jax.__version__})"
  if impl not in registered(op):
    return (f"{impl} is not registered in kernels.{PACKAGES[op]} IMPLEMENTATIONS "
            f"(has: {', '.join(registered(op))})")
  if impl == "mosaic_gpu":
    try:
      importlib.import_module(f"..{PACKAGES[op]}.mosaic_gpu", __package__)
    except Exception as e:  # noqa: BLE001 - a module that does not import is a row's reason
      return f"kernels.{PACKAGES[op]}.mosaic_gpu does not import: {type(e).__name__}: {e}"
  if platform != "gpu" and impl in ("cudnn",):
    return "cuDNN needs a GPU"
  return None


def plan_markdown(plan: list[Entry], platform: str) -> list[str]:
  """The plan as a markdown table, one line per cell, with its status on this machine."""
  lines = ["| # | op | mode | variant | shape | impl | metric | status here |",
           "|---|---|---|---|---|---|---|---|"]
  reasons: dict = {}
  for i, e in enumerate(plan):
    key = (e.op, e.impl)
    if key not in reasons:
      reasons[key] = unavailable_reason(e.op, e.impl, platform)
    why = reasons[key]
    status = "measured on GPU" if why is None else why
    lines.append(f"| {i + 1} | {e.op} | {e.mode} | {e.variant or '-'} | {e.shape} | {e.impl} | "
                 f"{e.metric} | {status} |")
  return lines


def plan_summary(plan: list[Entry]) -> list[str]:
  """Counts per op and implementation."""
  counts: dict = {}
  for e in plan:
    counts.setdefault(e.op, {}).setdefault(e.impl, 0)
    counts[e.op][e.impl] += 1
  out = [f"plan: {len(plan)} cells"]
  for op, per in counts.items():
    out.append(f"  {op}: " + ", ".join(f"{impl} {n}" for impl, n in per.items()))
  return out

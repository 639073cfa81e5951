"""What the Pallas Mosaic GPU (``plgpu``) kernels share: the JAX version gate, interpret mode,
and reading an exported kernel back for structural checks.

Mosaic GPU is Pallas's supported GPU backend from JAX 0.11 (the Triton backend is deprecated
there). Its API changed between 0.10 and 0.12 (``plgpu.load``, ``ref.transpose``,
``lax.axis_index`` grids, the GPU interpreter), so these kernels target JAX >= 0.11 only and
say so in one line on older JAX.

Two CPU checks cover a kernel without a GPU (``../shared/FACTS-mosaic-gpu.md``):
  * numerics: ``interpret=True`` runs it in Pallas's GPU interpreter (simulated GMEM/SMEM,
    warpgroups, barriers, TMA, wgmma) with race detection;
  * lowering: ``jax.export(..., platforms=["cuda"])`` runs the real Mosaic GPU lowering
    (layout inference, shared-memory budget, tiling), and :func:`exported_kernels` decodes
    the embedded kernel so a test can assert on its wgmma shapes, TMA copies, threads and
    shared memory.
"""
from __future__ import annotations

import dataclasses
import re

import jax

from . import autotune

MIN_JAX = (0, 11)
# Hopper's shared memory per block (227 KiB); Mosaic GPU refuses kernels above it.
MAX_SMEM_BYTES = 232_448


def jax_version() -> tuple[int, int]:
  return tuple(int(p) for p in jax.__version__.split(".")[:2])


def version_error() -> str | None:
  """Why Mosaic GPU kernels cannot run with this JAX, or None."""
  if jax_version() < MIN_JAX:
    return (f"implementation='mosaic_gpu' needs JAX >= {MIN_JAX[0]}.{MIN_JAX[1]} (Pallas Mosaic GPU "
            f"API); this is JAX {jax.__version__}. Use implementation='triton' or upgrade JAX")
  return None


def unsupported_platform_reason(platform: str, interpret: bool) -> str | None:
  """The version gate plus: without interpret mode the kernel needs a GPU."""
  reason = version_error()
  if reason is None and not interpret and platform != "gpu":
    reason = (f"implementation='mosaic_gpu' runs on NVIDIA GPUs (sm_90+), not on {platform!r}; "
              "pass interpret=True to run it in Pallas's GPU interpreter, or pick another "
              "implementation")
  return reason


def check_available(op: str, interpret: bool, platform: str | None = None):
  """Raise the one-line ValueError for ``implementation="mosaic_gpu"`` where it cannot run."""
  from . import platforms
  reason = unsupported_platform_reason(platform or platforms.current(), interpret)
  if reason is not None:
    raise ValueError(f"{op}: {reason}")


def interpret_params(interpret: bool, *, detect_races: bool = True):
  """``plgpu.kernel(interpret=...)``: the GPU interpreter (CPU tests) or None (compile)."""
  if not interpret:
    return None
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.InterpretGPUParams(detect_races=detect_races)


def kernel_kwargs(interpret: bool) -> dict:
  """Extra ``plgpu.kernel`` keyword arguments: ``interpret=`` only when interpreting."""
  params = interpret_params(interpret)
  return {} if params is None else {"interpret": params}


@dataclasses.dataclass(frozen=True)
class KernelSummary:
  """What an exported Mosaic GPU kernel does, read from its lowered MLIR."""
  text: str
  arch_major: int | None
  threads: int | None
  smem_bytes: int | None
  wgmma_shapes: frozenset  # e.g. {"m64n128k16"}
  wgmma_types: frozenset   # e.g. {"f32.bf16.bf16"}
  tma_copies: int          # cp.async.bulk.tensor instructions (TMA loads and stores)
  grid: tuple | None


def summarize(text: str) -> KernelSummary:
  def first_int(pattern):
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None

  wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.([a-z0-9.]+?)[\s\"{]",
                     text)
  grid = re.search(r"gpu\.launch[^\n]*blocks\(.*?\) in \(.*?= %c(\d+)[^,]*, .*?= %c(\d+)[^,]*, "
                   r".*?= %c(\d+)", text)
  threads = None
  m = re.search(r"threads\(.*?\) in \(.*?= %c(\d+)[^,]*, .*?= %c(\d+)[^,]*, .*?= %c(\d+)", text)
  if m:
    threads = int(m.group(1)) * int(m.group(2)) * int(m.group(3))
  return KernelSummary(
      text=text, arch_major=first_int(r"arch_major = (\d+)"), threads=threads,
      smem_bytes=first_int(r"dynamic_shared_memory_size %c(\d+)"),
      wgmma_shapes=frozenset(s for s, _ in wgmma), wgmma_types=frozenset(t for _, t in wgmma),
      tma_copies=len(re.findall(r"cp\.async\.bulk\.tensor", text)),
      grid=tuple(int(g) for g in grid.groups()) if grid else None)


def exported_kernels(exported) -> list[KernelSummary]:
  """Every Mosaic GPU kernel (``mosaic_gpu_v2`` custom call) inside a ``jax.export.Exported``.

  The custom call carries the kernel as serialized MLIR after Pallas lowering, layout
  inference and the Mosaic GPU dialect lowering (inline PTX included): deserialize it in a
  context with the mosaic_gpu dialect registered (a bare ``ir.Context()`` crashes).
  """
  from jax._src.interpreters import mlir as jmlir
  from jax._src.lib.mlir import ir, passmanager
  from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

  blobs = []
  with jmlir.make_ir_context():
    module = ir.Module.parse(exported.mlir_module())
    ops = [o for f in module.body.operations for r in f.regions for b in r.blocks
           for o in b.operations]
    for op in ops:
      if (op.operation.name == "stablehlo.custom_call" and
          ir.StringAttr(op.attributes["call_target_name"]).value == "mosaic_gpu_v2"):
        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
        blobs.append(bytes(ir.StringAttr(config["module"]).value_bytes))
  summaries = []
  for blob in blobs:
    ctx = jmlir.make_ir_context()
    mgpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True  # serialized ops are "stable_mosaic_gpu.*"
    with ctx, ir.Location.unknown():
      kernel = ir.Module.parse(blob)
      passmanager.PassManager.parse(
          "builtin.module(mosaic_gpu-serde{serialize=false})").run(kernel.operation)
      summaries.append(summarize(str(kernel)))
  return summaries


def export_for_cuda(fn, *shapes):
  """``jax.export`` of ``jax.jit(fn)`` for cuda at the given ShapeDtypeStructs (no GPU needed)."""
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*shapes)


__all__ = ["MIN_JAX", "MAX_SMEM_BYTES", "version_error", "unsupported_platform_reason",
           "check_available", "interpret_params", "kernel_kwargs", "KernelSummary", "summarize",
           "exported_kernels", "export_for_cuda"]


# ---------------------------------------------------------------- kernel-building helpers
# (appended for the softmax / norms / cross-entropy kernels; plgpu imported lazily so this
# module still imports on JAX < 0.11, where those kernels only raise ``version_error``.)

# Rows of a WGMMA register layout tile: row-blocked kernels take a multiple of this many rows.
WGMMA_ROWS = 64


def round_up(a: int, b: int) -> int:
  return -(-int(a) // int(b)) * int(b)


def pad2(a, rows: int, cols: int, value=0):
  """``a`` ([r, c]) padded at the end to ``[rows, cols]`` with ``value``."""
  r, c = a.shape
  if (r, c) == (rows, cols):
    return a
  return jax.numpy.pad(a, ((0, rows - r), (0, cols - c)), constant_values=value)


def warpgroup_params():
  """``compiler_params`` for kernels written per warpgroup (one 128-thread warpgroup)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def pipeline(body, *, grid, in_specs, stages: int, init_carry=None):
  """``plgpu.emit_pipeline`` over input blocks whose body fences its shared-memory reads.

  The pipeline refills a slot with TMA right after the body that read it; ``commit_smem``
  (``fence.proxy.async``) orders the body's generic-proxy reads before that async-proxy
  write, which the GPU interpreter's race detector otherwise reports as a race.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def fenced(*args):
    out = body(*args)
    plgpu.commit_smem()
    return out

  return plgpu.emit_pipeline(fenced, grid=grid, in_specs=in_specs,
                             max_concurrent_steps=stages, init_carry=init_carry)


def store_tiles(step, tiles):
  """Write ``tiles`` (``(ring, value, gmem_dst)``; ``ring`` is a 2-slot SMEM buffer) at ``step``.

  Each value goes to slot ``step % 2`` and is copied out with TMA. Before overwriting the
  slot, wait until only the previous step's copies (one per tile) may still be reading
  shared memory: double-buffered stores without a full wait per step.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu
  slot = step % 2
  plgpu.wait_smem_to_gmem(len(tiles), wait_read_only=True)
  for ring, value, _ in tiles:
    ring.at[slot][...] = value.astype(ring.dtype)
  plgpu.commit_smem()
  for ring, _, dst in tiles:
    plgpu.copy_smem_to_gmem(ring.at[slot], dst)


def config_error(op: str, cfg, why: str) -> ValueError:
  return ValueError(f"{op} mosaic_gpu: config {cfg} is not valid: {why}")


def resolve_config(op: str, key: str, config_type, dims, dtype, config, heuristic, problem):
  """The block config of one kernel: `config` itself (a `config_type`), or its fields over the
  heuristic's (a mapping), or else the autotune cache entry `key` for this device, else the
  heuristic. heuristic() -> config_type; problem(cfg) -> why it cannot run, or None (checked
  on every path, so a bad cache entry or override is one ValueError naming the op)."""
  if isinstance(config, config_type):
    cfg = config
  elif config is not None:
    cfg = config_type(**{**dataclasses.asdict(heuristic()), **dict(config)})
  else:
    cfg = config_type(**autotune.get_config(
        key, dims, dtype, lambda: dataclasses.asdict(heuristic()),
        validate=lambda c: problem(config_type(**c)) is None))
  why = problem(cfg)
  if why:
    raise config_error(op, cfg, why)
  return cfg

"""Benchmark, check and autotune the kernels: ``python -m kernels.bench --op=... ``.

Examples::

  python -m kernels.bench --op=softmax --shapes=4096x1000,4096x50257 --dtype=bf16 --mode=fwd_bwd
  python -m kernels.bench --op=linear_cross_entropy --shapes=8192x512x32768 --autotune
  python -m kernels.bench --op=layer_norm --implementations=xla,triton --plot=ln.png --json=ln.jsonl
  python -m kernels.bench --memory-check          # xla vs xla_chunked cross-entropy memory
  python -m kernels.bench --op=rms_norm --lower   # lower the Triton kernels for CUDA from CPU

Per implementation and shape it prints the median time (device-synchronised, after
warm-up), TFLOP/s and GB/s from each op's analytic FLOP and byte counts, the percent of
the device's peak on the bound that applies (compute or bandwidth, from
``kernels/roofline.py``, or measured with ``--measure-ceiling``), the max error against
the float32 reference (relative to its largest magnitude; also absolute in the JSON),
and the compiled temporary memory (plus the device's peak bytes in use where the
backend reports it). ``--json`` writes the rows as JSON lines and
``--plot`` a PNG of throughput against problem size (needs matplotlib).

FLOP counts are algorithmic: the cross-entropy backward's logits recomputation and
attention's masked half are not counted. Shapes: softmax ``RxC`` (rows x row length),
norms ``NxD``, linear_cross_entropy ``NxDxV``, attention ``BxTxHxD`` (batch, sequence,
heads, head dim; causal).

On CPU the xla rows time XLA:CPU, the triton rows run in Pallas interpret mode and the
mosaic_tpu rows in Pallas's TPU interpreter, for correctness: none is a kernel timing. On a
TPU the mosaic_tpu rows are the Mosaic kernels (roofline peaks for v4, v5e, v5p, v6e in
``kernels/roofline.py``); rows a platform cannot run (triton on TPU, mosaic_tpu on GPU)
report an error instead of a time. ``--autotune`` sweeps each Triton kernel's
block sizes, warps and stages and stores the winners in the autotune cache (see
``kernels/autotune.py``; ``--cache`` picks the file).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import autotune, roofline

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16,
          "float16": jnp.float16, "f32": jnp.float32, "float32": jnp.float32}
MODES = ("fwd", "fwd_bwd")
MEMORY_CHECK_SHAPE = (8192, 512, 32768)
MEMORY_CHECK_RATIO = 1 / 16
_TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
# Pallas implementations: on CPU they run in interpret mode (the TPU interpreter for mosaic_tpu).
_PALLAS_IMPLS = ("triton", "mosaic_tpu")


# ---------------------------------------------------------------- op specs

@dataclasses.dataclass(frozen=True)
class OpSpec:
  name: str
  shape_doc: str
  ndims: int
  default_shapes: tuple[str, ...]
  implementations: Callable[[], tuple[str, ...]]
  make_inputs: Callable[[tuple, Any, jax.Array], tuple[tuple, tuple[int, ...]]]
  run: Callable[..., Any]          # run(impl, args, interpret) -> output
  flops: Callable[[tuple, str], float]
  bytes: Callable[[tuple, Any, str], float]
  size: Callable[[tuple], int]     # problem size for plots and interpret limits
  memory_bound: bool


def _itemsize(dtype):
  return jnp.dtype(dtype).itemsize


def _normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _softmax_inputs(dims, dtype, key):
  return (_normal(key, dims, dtype, 2.0),), (0,)


def _norm_inputs(dims, dtype, key, with_offset=True):
  k1, k2, k3 = jax.random.split(key, 3)
  n, d = dims
  args = [_normal(k1, (n, d), dtype, 2.0), 1.0 + _normal(k2, (d,), dtype, 0.1)]
  if with_offset:
    args.append(_normal(k3, (d,), dtype, 0.1))
  return tuple(args), tuple(range(len(args)))


def _lce_inputs(dims, dtype, key):
  n, d, v = dims
  k1, k2, k3 = jax.random.split(key, 3)
  x = _normal(k1, (n, d), dtype)
  w = _normal(k2, (d, v), dtype, d ** -0.5)
  labels = jax.random.randint(k3, (n,), 0, v)
  return (x, w, labels), (0, 1)


def _attention_inputs(dims, dtype, key):
  b, t, h, d = dims
  ks = jax.random.split(key, 3)
  return tuple(_normal(k, (b, t, h, d), dtype) for k in ks), (0, 1, 2)


def _module_impls(module, fallback):
  def get():
    try:
      return tuple(getattr(importlib.import_module(module), "IMPLEMENTATIONS"))
    except (ImportError, AttributeError):
      return fallback
  return get


def _run_softmax(impl, args, interpret):
  from .softmax import softmax
  return softmax(args[0], implementation=impl, interpret=interpret)


def _run_layer_norm(impl, args, interpret):
  from .norms import layer_norm
  return layer_norm(*args, implementation=impl, interpret=interpret)


def _run_rms_norm(impl, args, interpret):
  from .norms import rms_norm
  return rms_norm(*args, implementation=impl, interpret=interpret)


def _run_lce(impl, args, interpret):
  from .cross_entropy import linear_cross_entropy
  return linear_cross_entropy(*args, implementation=impl, interpret=interpret)


def _run_attention(impl, args, interpret):
  from . import dot_product_attention
  return dot_product_attention(*args, is_causal=True, implementation=impl, interpret=interpret)


def _attn_flops(dims, mode):
  b, t, h, d = dims
  try:  # the attention package's own count (exact causal pairs), if it has one
    from .attention.bench import attention_flops
    return float(attention_flops(b, t, t, h, d, causal=True, backward=mode == "fwd_bwd"))
  except (ImportError, AttributeError, TypeError):
    fwd = 4.0 * b * h * d * t * (t + 1) / 2  # causal pairs
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


OPS: dict[str, OpSpec] = {
    "softmax": OpSpec(
        "softmax", "RxC", 2, ("4096x1024", "4096x8192", "1024x50257"),
        _module_impls("kernels.softmax", ("xla", "triton")), _softmax_inputs, _run_softmax,
        flops=lambda dims, mode: math.prod(dims) * (5.0 + (4.0 if mode == "fwd_bwd" else 0.0)),
        bytes=lambda dims, dt, mode: math.prod(dims) * _itemsize(dt) * (5 if mode == "fwd_bwd" else 2),
        size=lambda dims: math.prod(dims), memory_bound=True),
    "layer_norm": OpSpec(
        "layer_norm", "NxD", 2, ("8192x1024", "8192x4096", "4096x12288"),
        _module_impls("kernels.norms", ("xla", "triton")), _norm_inputs, _run_layer_norm,
        flops=lambda dims, mode: math.prod(dims) * (8.0 + (12.0 if mode == "fwd_bwd" else 0.0)),
        bytes=lambda dims, dt, mode: (math.prod(dims) * (5 if mode == "fwd_bwd" else 2)
                                      + dims[1] * (6 if mode == "fwd_bwd" else 2)) * _itemsize(dt),
        size=lambda dims: math.prod(dims), memory_bound=True),
    "rms_norm": OpSpec(
        "rms_norm", "NxD", 2, ("8192x1024", "8192x4096", "4096x12288"),
        _module_impls("kernels.norms", ("xla", "triton")),
        lambda dims, dt, key: _norm_inputs(dims, dt, key, with_offset=False), _run_rms_norm,
        flops=lambda dims, mode: math.prod(dims) * (5.0 + (9.0 if mode == "fwd_bwd" else 0.0)),
        bytes=lambda dims, dt, mode: (math.prod(dims) * (5 if mode == "fwd_bwd" else 2)
                                      + dims[1] * (3 if mode == "fwd_bwd" else 1)) * _itemsize(dt),
        size=lambda dims: math.prod(dims), memory_bound=True),
    "linear_cross_entropy": OpSpec(
        "linear_cross_entropy", "NxDxV", 3, ("8192x512x32768", "8192x1024x50257"),
        _module_impls("kernels.cross_entropy", ("xla", "xla_chunked", "triton")), _lce_inputs,
        _run_lce,
        flops=lambda dims, mode: 2.0 * math.prod(dims) * (3 if mode == "fwd_bwd" else 1),
        bytes=lambda dims, dt, mode: ((dims[0] * dims[1] + dims[1] * dims[2]) * _itemsize(dt)
                                      * (3 if mode == "fwd_bwd" else 1) + 4 * dims[0]),
        size=lambda dims: dims[0] * dims[2], memory_bound=False),
    "attention": OpSpec(
        "attention", "BxTxHxD", 4, ("4x1024x16x64", "2x4096x16x128"),
        _module_impls("kernels.attention", ("xla", "xla_chunked", "triton", "cudnn")),
        _attention_inputs, _run_attention, flops=_attn_flops,
        bytes=lambda dims, dt, mode: math.prod(dims) * _itemsize(dt) * (12 if mode == "fwd_bwd" else 4),
        size=lambda dims: dims[0] * dims[2] * dims[1] * dims[1], memory_bound=False),
}


def parse_shapes(spec: OpSpec, text: str) -> list[tuple[int, ...]]:
  shapes = []
  for item in text.split(","):
    item = item.strip().lower()
    if not item:
      continue
    parts = item.split("x")
    if len(parts) != spec.ndims or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"shape {item!r} for --op={spec.name} must be {spec.shape_doc} "
                       f"({spec.ndims} positive integers joined by 'x')")
    shapes.append(tuple(int(p) for p in parts))
  if not shapes:
    raise ValueError("--shapes is empty")
  return shapes


# ---------------------------------------------------------------- measuring

def lower_for_cuda(fn: Callable, *args, device_kind: str = "NVIDIA H100 80GB HBM3",
                   num_cores: int = 132) -> str:
  """Export ``jax.jit(fn)`` for CUDA from any machine; returns the StableHLO text.

  Pallas Triton kernels appear as ``__gpu$xla.gpu.triton`` custom calls (allowed via
  ``disabled_checks``); a pretend GPU (abstract mesh) stands in for a real one.
  """
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), abstract_device=device)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
    with use_abstract_mesh(mesh):
      exported = jax.export.export(
          jax.jit(fn), platforms=["cuda"],
          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CUSTOM_CALL)],
      )(*args)
  return exported.mlir_module()


def _abstract(args):
  return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)


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


def _cotangent(spec, args):
  out = jax.eval_shape(lambda *a: spec.run("xla", a, False), *args)
  return _normal(jax.random.key(7), out.shape, jnp.float32)


def time_fn(fn, args, *, warmup: int, reps: int) -> list[float]:
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(reps, 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def _temp_bytes(compiled) -> int | None:
  try:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else None
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def compiled_temp_bytes(jitted, *args) -> int | None:
  """XLA's compiled memory analysis: temporary bytes of ``jitted`` at these arguments."""
  try:
    return _temp_bytes(jitted.lower(*args).compile())
  except Exception:  # noqa: BLE001
    return None


def max_errors(a, b) -> tuple[float, float]:
  """(max abs error, max error relative to each leaf's largest reference magnitude)."""
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
    rel_err = max(rel_err, e / max(float(np.max(np.abs(y))), 1e-30))
  return abs_err, rel_err


def _peak_bytes_in_use() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
  except Exception:  # noqa: BLE001
    return None


_REF_CACHE: dict = {}  # the float32 reference of the latest (op, shape, dtype, mode)


def bench_one(spec: OpSpec, impl: str, dims: tuple, dtype, mode: str, *, warmup: int, reps: int,
              device_spec: roofline.DeviceSpec | None, on_cpu: bool,
              max_interpret_size: int) -> dict:
  interpret = on_cpu and impl in _PALLAS_IMPLS
  row = {"op": spec.name, "impl": impl, "shape": list(dims), "dims": "x".join(map(str, dims)),
         "dtype": jnp.dtype(dtype).name, "mode": mode, "platform": jax.default_backend(),
         "device_kind": autotune.device_kind(), "interpret": interpret}
  if on_cpu and impl == "cudnn":
    row["error"] = "cudnn needs a GPU"
    return row
  if not on_cpu and (impl == "mosaic_tpu") != (jax.default_backend() == "tpu") and (
      impl in ("mosaic_tpu", "triton", "cudnn")):
    row["error"] = f"{impl} does not run on {jax.default_backend()}"
    return row
  if interpret and spec.size(dims) > max_interpret_size:
    row["error"] = (f"skipped: size {spec.size(dims)} > --max-interpret-size "
                    f"{max_interpret_size} for interpret mode")
    return row
  args, diff = spec.make_inputs(dims, dtype, jax.random.key(0))
  fn = build_fn(spec, impl, mode, diff, interpret)
  ref_fn = build_fn(spec, "xla", mode, diff, False)
  ref_args = tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
                   for a in args)
  if mode == "fwd_bwd":
    ct = _cotangent(spec, args)
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
             temp_bytes=_temp_bytes(compiled),
             peak_bytes_in_use=None if on_cpu else _peak_bytes_in_use())
  peak_tf = roofline.peak_tflops(device_spec, dtype)
  if device_spec is not None:
    bw_frac = row["gbps"] / device_spec.hbm_gbps
    flop_frac = row["tflops"] / peak_tf if peak_tf else None
    memory_bound = spec.memory_bound
    if peak_tf:  # decide by arithmetic intensity against the machine balance
      memory_bound = flops / nbytes < peak_tf * 1e12 / (device_spec.hbm_gbps * 1e9)
    row["bound"] = "memory" if memory_bound or flop_frac is None else "compute"
    row["pct_peak"] = 100 * (bw_frac if row["bound"] == "memory" else flop_frac)
    row["peak_source"] = device_spec.source
  return row


# ---------------------------------------------------------------- autotuning

def _tuning_problems(op: str, dims, dtype, interpret: bool):
  """(kind, module, make_callable(config) -> thunk, inputs) for each Triton kernel of op."""
  key = jax.random.key(1)
  if op == "softmax":
    from .softmax import triton as mod
    x = _normal(key, dims, dtype)
    g = _normal(jax.random.key(2), dims, dtype)
    p = mod.forward(x, None, scale=1.0, config=mod.heuristic_config("fwd", dims, dtype),
                    interpret=interpret)
    return mod, {
        "fwd": (lambda c: lambda a: mod.forward(a, None, scale=1.0, config=c, interpret=interpret),
                (x,)),
        "bwd": (lambda c: lambda a, b: mod.backward(a, b, scale=1.0, config=c,
                                                     interpret=interpret), (p, g)),
    }
  if op in ("layer_norm", "rms_norm"):
    from .norms import triton as mod
    n, d = dims
    x = _normal(key, dims, dtype)
    w = jnp.ones((d,), dtype)
    b = jnp.zeros((d,), dtype) if op == "layer_norm" else None
    dy = _normal(jax.random.key(2), dims, dtype)
    _, mean, rstd = mod.forward(x, w, b, eps=1e-6, config=mod.heuristic_config("fwd", dims, dtype),
                                interpret=interpret)
    return mod, {
        "fwd": (lambda c: lambda a, ww: mod.forward(a, ww, b, eps=1e-6, config=c,
                                                     interpret=interpret), (x, w)),
        "bwd": (lambda c: lambda a, ww, gg: mod.backward(a, ww, gg, mean, rstd, config=c,
                                                          interpret=interpret), (x, w, dy)),
    }
  if op == "linear_cross_entropy":
    from .cross_entropy import triton as mod
    (x, w, labels), _ = _lce_inputs(dims, dtype, key)
    lse, _, _ = mod.forward(x, w, labels, smoothing=0.0,
                            config=mod.heuristic_config("fwd", dims, dtype), interpret=interpret)
    gs = jnp.full((dims[0],), 1.0 / dims[0], jnp.float32)
    return mod, {
        "fwd": (lambda c: lambda a, ww: mod.forward(a, ww, labels, smoothing=0.0, config=c,
                                                     interpret=interpret), (x, w)),
        "bwd": (lambda c: lambda a, ww: mod.backward(a, ww, labels, lse, gs, smoothing=0.0,
                                                      z_loss=0.0, config=c, interpret=interpret),
                (x, w)),
    }
  return None, {}


def autotune_op(op: str, dims, dtype, *, cache_path=None, interpret=False, max_configs=None,
                warmup=3, reps=20, log=print) -> dict:
  """Sweep each Triton kernel of ``op`` at ``dims`` and record the winners; returns them."""
  mod, problems = _tuning_problems(op, dims, dtype, interpret)
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


# ---------------------------------------------------------------- memory check

def memory_check(dims=MEMORY_CHECK_SHAPE, dtype=jnp.float32) -> dict:
  """Compiled temporary memory of the cross-entropy fwd+bwd: "xla" vs "xla_chunked"."""
  from .cross_entropy import linear_cross_entropy
  n, d, v = dims
  avals = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
           jax.ShapeDtypeStruct((n,), jnp.int32))
  out = {"shape": list(dims), "dtype": jnp.dtype(dtype).name, "platform": jax.default_backend()}
  for impl in ("xla", "xla_chunked"):
    f = jax.jit(jax.value_and_grad(
        lambda x, w, l, impl=impl: linear_cross_entropy(x, w, l, implementation=impl), (0, 1)))
    out[impl] = compiled_temp_bytes(f, *avals)
  out["ratio"] = out["xla_chunked"] / out["xla"]
  out["ok"] = out["ratio"] <= MEMORY_CHECK_RATIO
  return out


# ---------------------------------------------------------------- output

def _fmt_bytes(b):
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
                  f"{r['max_rel_err']:.2e}", _fmt_bytes(r["temp_bytes"]),
                  _fmt_bytes(r["peak_bytes_in_use"]), note])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


_SIZE_DOC = {"softmax": "R*C", "layer_norm": "N*D", "rms_norm": "N*D",
             "linear_cross_entropy": "N*V", "attention": "B*H*T*T"}


def plot(rows: Sequence[dict], path: str) -> None:
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
    spec = OPS[op]
    group.sort(key=lambda r: spec.size(tuple(r["shape"])))
    metric = "gbps" if spec.memory_bound else "tflops"
    interp = " (interpret)" if group[0]["interpret"] else ""
    ax.plot([spec.size(tuple(r["shape"])) for r in group], [r[metric] for r in group],
            marker="o", label=f"{op} {impl}{interp} {mode}")
  ax.set_xscale("log")
  ops = sorted({r["op"] for r in ok})
  ax.set_xlabel("problem size: " + "; ".join(f"{o} {_SIZE_DOC[o]}" for o in ops))
  memory = all(OPS[r["op"]].memory_bound for r in ok) if ok else True
  ax.set_ylabel("GB/s" if memory else "TFLOP/s")
  ax.set_title(f"kernels.bench on {autotune.device_kind()}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _groups(rows):
  out: dict[tuple, list] = {}
  for r in rows:
    out.setdefault((r["op"], r["impl"], r["mode"]), []).append(r)
  return out


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--op", choices=sorted(OPS), help="the op to benchmark")
  p.add_argument("--implementations", default=None,
                 help="comma-separated implementation names (default: all of the op's)")
  p.add_argument("--shapes", default=None,
                 help="comma-separated shapes: softmax RxC, norms NxD, linear_cross_entropy "
                      "NxDxV, attention BxTxHxD")
  p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                 help="input dtype (default bf16; float32 for --memory-check)")
  p.add_argument("--mode", default="fwd", choices=MODES)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reps", type=int, default=None, help="timed repetitions (GPU 50, CPU 5)")
  p.add_argument("--autotune", action="store_true",
                 help="sweep Triton block sizes/warps/stages first and cache the winners")
  p.add_argument("--cache", default=None,
                 help=f"autotune cache file to write (default ${autotune.CACHE_ENV} or "
                      "~/.cache/llmx/autotune.json)")
  p.add_argument("--max-configs", type=int, default=None,
                 help="cap on configs tried per kernel when autotuning (CPU default 2)")
  p.add_argument("--measure-ceiling", action="store_true",
                 help="use measured copy bandwidth and matmul throughput as the peak")
  p.add_argument("--json", default=None, help="write rows as JSON lines to this file ('-': stdout)")
  p.add_argument("--plot", default=None, help="write a PNG of throughput against size")
  p.add_argument("--memory-check", action="store_true",
                 help="compiled temp memory of cross-entropy fwd+bwd, xla vs xla_chunked "
                      "(default shape 8192x512x32768 float32); exits 1 above 1/16")
  p.add_argument("--lower", action="store_true",
                 help="only lower the op's Triton implementation for CUDA (works on CPU)")
  p.add_argument("--max-interpret-size", type=int, default=1 << 22,
                 help="largest problem run in interpret mode on CPU")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  saved = os.environ.get(autotune.CACHE_ENV)
  if args.cache:  # the ops read the cache the tuner writes
    os.environ[autotune.CACHE_ENV] = str(args.cache)
  try:
    return _main(parser, args)
  finally:
    if saved is None:
      os.environ.pop(autotune.CACHE_ENV, None)
    else:
      os.environ[autotune.CACHE_ENV] = saved


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  dtype = DTYPES[args.dtype or "bf16"]
  on_cpu = jax.default_backend() == "cpu"

  if args.memory_check:
    dims = MEMORY_CHECK_SHAPE
    if args.shapes:
      try:
        dims = parse_shapes(OPS["linear_cross_entropy"], args.shapes)[0]
      except ValueError as e:
        parser.error(str(e))
    res = memory_check(dims, DTYPES[args.dtype or "f32"])
    print(f"linear_cross_entropy fwd+bwd, N x D x V = {'x'.join(map(str, dims))}, "
          f"{res['dtype']}, compiled on {res['platform']} (XLA memory analysis, temp bytes):")
    print(f"  xla          {_fmt_bytes(res['xla']):>10} MiB")
    print(f"  xla_chunked  {_fmt_bytes(res['xla_chunked']):>10} MiB")
    print(f"  ratio        {res['ratio']:.4f} (1/{1 / res['ratio']:.1f}); required <= 1/16: "
          f"{'OK' if res['ok'] else 'FAIL'}")
    if args.json:
      _write_json([{"memory_check": True, **res}], args.json)
    return 0 if res["ok"] else 1

  if args.op is None:
    parser.error("--op is required (one of " + ", ".join(sorted(OPS)) + ")")
  spec = OPS[args.op]
  known = spec.implementations()
  impls = [s.strip() for s in args.implementations.split(",")] if args.implementations else list(known)
  for impl in impls:
    if impl not in known:
      parser.error(f"unknown implementation {impl!r} for --op={spec.name}; choose from "
                   f"{', '.join(known)}")
  try:
    shapes = parse_shapes(spec, args.shapes) if args.shapes else [
        tuple(int(p) for p in s.split("x")) for s in spec.default_shapes]
  except ValueError as e:
    parser.error(str(e))

  if args.lower:
    return _lower_cli(spec, shapes, dtype, args.mode)

  kind = autotune.device_kind()
  print(f"# kernels.bench: {spec.name}, {args.mode}, {jnp.dtype(dtype).name}, "
        f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}")
  if on_cpu:
    print("# CPU: timings are not kernel timings. xla rows time XLA:CPU; triton rows run "
          "in Pallas interpret mode and mosaic_tpu rows in the TPU interpreter (correctness "
          "only).")
  device_spec = roofline.lookup(kind)
  if args.measure_ceiling:
    device_spec = roofline.measure_ceiling(dtype)
    print(f"# measured ceiling: copy {device_spec.hbm_gbps:.1f} GB/s, matmul "
          f"{list(device_spec.tflops.values())[0]:.2f} TFLOP/s")
  elif device_spec is not None:
    print(f"# roofline: {device_spec.name} datasheet, {device_spec.hbm_gbps:.0f} GB/s, "
          f"{roofline.peak_tflops(device_spec, dtype) or '-'} TFLOP/s ({jnp.dtype(dtype).name})")
  else:
    print("# roofline: no peak table entry for this device (no %peak; try --measure-ceiling)")

  if args.autotune:
    if "triton" not in impls:
      print("# autotune: only Triton kernels are tuned; 'triton' not in --implementations")
    else:
      if on_cpu:
        print("# autotune on CPU runs interpret mode: it exercises the sweep and the cache, "
              "but the winners mean nothing for a GPU")
      max_configs = args.max_configs if args.max_configs is not None else (2 if on_cpu else None)
      for dims in shapes:
        if on_cpu and spec.size(dims) > args.max_interpret_size:
          print(f"# autotune: {dims} too big for interpret mode; skipped")
          continue
        autotune_op(spec.name, dims, dtype, cache_path=args.cache, interpret=on_cpu,
                    max_configs=max_configs, warmup=1 if on_cpu else 3, reps=2 if on_cpu else 20)

  reps = args.reps if args.reps is not None else (5 if on_cpu else 50)
  rows = []
  for dims in shapes:
    for impl in impls:
      rows.append(bench_one(spec, impl, dims, dtype, args.mode, warmup=args.warmup, reps=reps,
                            device_spec=device_spec, on_cpu=on_cpu,
                            max_interpret_size=args.max_interpret_size))
  print(format_table(rows))
  if spec.name == "linear_cross_entropy":
    temps = {(r["dims"], r["impl"]): r.get("temp_bytes") for r in rows}
    for dims in shapes:
      key = "x".join(map(str, dims))
      a, b = temps.get((key, "xla")), temps.get((key, "xla_chunked"))
      if a and b:
        print(f"# memory {key}: xla_chunked / xla temp = {b / a:.4f}")
  if args.json:
    _write_json(rows, args.json)
  if args.plot:
    try:
      plot(rows, args.plot)
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"# plot written to {args.plot}")
  return 0


def _lower_cli(spec: OpSpec, shapes, dtype, mode) -> int:
  if "triton" not in spec.implementations():
    print(f"--lower: --op={spec.name} has no triton implementation")
    return 1
  failed = 0
  for dims in shapes:
    args, diff = spec.make_inputs(dims, dtype, jax.random.key(0))
    fn = build_fn(spec, "triton", mode, diff, False)
    if mode == "fwd_bwd":
      args = (_cotangent(spec, args),) + args
    t0 = time.perf_counter()
    try:
      text = lower_for_cuda(fn, *_abstract(args))
      n = text.count(_TRITON_CUSTOM_CALL)
      print(f"{spec.name} {'x'.join(map(str, dims))} {jnp.dtype(dtype).name} {mode}: lowered "
            f"for cuda, {n} Triton custom call(s), {time.perf_counter() - t0:.1f} s")
      failed += n == 0
    except Exception as e:  # noqa: BLE001
      failed += 1
      print(f"{spec.name} {'x'.join(map(str, dims))}: FAILED {type(e).__name__}: {e}")
  return 1 if failed else 0


def _write_json(rows, path):
  text = "\n".join(json.dumps(r, default=float) for r in rows) + "\n"
  if path == "-":
    sys.stdout.write(text)
  else:
    with open(path, "a") as f:
      f.write(text)


if __name__ == "__main__":
  sys.exit(main())

"""Benchmark, check and autotune the kernels: ``python -m kernels.bench --op=... ``, or the GPU
report: ``python -m kernels.bench gpu_report --out=DIR [--dry_run]`` (``gpu_report.py``).

The command line only (flags, the order of the steps, what is printed); the package
docstring (``kernels/bench/__init__.py``) describes the tool, and the modules beside this
one do the work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from .. import autotune
from ..triton_common import TRITON_CUSTOM_CALL, lower_for_cuda
from . import roofline, spec as specs, tables, timing
from .tune import TUNED_IMPLS, autotune_op


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--op", choices=specs.names(), help="the op to benchmark")
  p.add_argument("--implementations", default=None,
                 help="comma-separated implementation names (default: all of the op's)")
  p.add_argument("--shapes", default=None,
                 help="comma-separated shapes: softmax RxC, norms NxD, linear_cross_entropy "
                      "NxDxV, attention BxTxHxD")
  p.add_argument("--dtype", default=None, choices=sorted(specs.DTYPES),
                 help="input dtype (default bf16; float32 for --memory-check)")
  p.add_argument("--mode", default="fwd", choices=specs.MODES)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reps", type=int, default=None, help="timed repetitions (GPU 50, CPU 5)")
  p.add_argument("--autotune", action="store_true",
                 help="sweep Triton block sizes/warps/stages and Mosaic GPU block sizes/pipeline "
                      "depth first and cache the winners")
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
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["gpu_report"]:  # the subcommand: python -m kernels.bench gpu_report --out=DIR
    from . import gpu_report
    return gpu_report.main(argv[1:])
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


def _memory_check_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from ..cross_entropy import bench_spec as lce
  dims = lce.MEMORY_CHECK_SHAPE
  if args.shapes:
    try:
      dims = specs.parse_shapes(specs.get("linear_cross_entropy"), args.shapes)[0]
    except ValueError as e:
      parser.error(str(e))
  res = lce.memory_check(dims, specs.DTYPES[args.dtype or "f32"])
  print(f"linear_cross_entropy fwd+bwd, N x D x V = {'x'.join(map(str, dims))}, "
        f"{res['dtype']}, compiled on {res['platform']} (XLA memory analysis, temp bytes):")
  print(f"  xla          {tables.fmt_bytes(res['xla']):>10} MiB")
  print(f"  xla_chunked  {tables.fmt_bytes(res['xla_chunked']):>10} MiB")
  print(f"  ratio        {res['ratio']:.4f} (1/{1 / res['ratio']:.1f}); required <= 1/16: "
        f"{'OK' if res['ok'] else 'FAIL'}")
  if args.json:
    tables.write_json([{"memory_check": True, **res}], args.json)
  return 0 if res["ok"] else 1


def _device_spec(dtype, measure: bool) -> roofline.DeviceSpec | None:
  """Prints the header and returns the peaks %peak is taken against (None: no %peak)."""
  device_spec = roofline.lookup(autotune.device_kind())
  if measure:
    device_spec = roofline.measure_ceiling(dtype)
    print(f"# measured ceiling: copy {device_spec.hbm_gbps:.1f} GB/s, matmul "
          f"{list(device_spec.tflops.values())[0]:.2f} TFLOP/s")
  elif device_spec is not None:
    print(f"# roofline: {device_spec.name} datasheet, {device_spec.hbm_gbps:.0f} GB/s, "
          f"{roofline.peak_tflops(device_spec, dtype) or '-'} TFLOP/s ({jnp.dtype(dtype).name})")
  else:
    print("# roofline: no peak table entry for this device (no %peak; try --measure-ceiling)")
  return device_spec


def _autotune_cli(spec: specs.OpSpec, impls, shapes, dtype, args, on_cpu: bool) -> None:
  tuned = [i for i in impls if i in TUNED_IMPLS]
  if not tuned:
    print(f"# autotune: only {' and '.join(TUNED_IMPLS)} kernels are tuned; neither is in "
          "--implementations")
    return
  if on_cpu:
    print("# autotune on CPU runs interpret mode: it exercises the sweep and the cache, "
          "but the winners mean nothing for a GPU")
  max_configs = args.max_configs if args.max_configs is not None else (2 if on_cpu else None)
  for impl in tuned:
    for dims in shapes:
      if on_cpu and spec.size(dims) > args.max_interpret_size:
        print(f"# autotune: {dims} too big for interpret mode; skipped")
        continue
      autotune_op(spec.name, dims, dtype, impl=impl, cache_path=args.cache, interpret=on_cpu,
                  max_configs=max_configs, warmup=1 if on_cpu else 3, reps=2 if on_cpu else 20)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  dtype = specs.DTYPES[args.dtype or "bf16"]
  on_cpu = jax.default_backend() == "cpu"
  if args.memory_check:
    return _memory_check_cli(parser, args)

  if args.op is None:
    parser.error("--op is required (one of " + ", ".join(specs.names()) + ")")
  spec = specs.get(args.op)
  known = spec.implementations
  impls = ([s.strip() for s in args.implementations.split(",")] if args.implementations
           else list(known))
  for impl in impls:
    if impl not in known:
      parser.error(f"unknown implementation {impl!r} for --op={spec.name}; choose from "
                   f"{', '.join(known)}")
  try:
    shapes = specs.parse_shapes(spec, args.shapes) if args.shapes else [
        tuple(int(p) for p in s.split("x")) for s in spec.default_shapes]
  except ValueError as e:
    parser.error(str(e))

  if args.lower:
    return _lower_cli(spec, shapes, dtype, args.mode)

  print(f"# kernels.bench: {spec.name}, {args.mode}, {jnp.dtype(dtype).name}, "
        f"device: {autotune.device_kind()} ({jax.default_backend()}), jax {jax.__version__}")
  if on_cpu:
    print("# CPU: timings are not kernel timings. xla rows time XLA:CPU; triton rows run "
          "in Pallas interpret mode and mosaic_tpu rows in the TPU interpreter (correctness "
          "only).")
  device_spec = _device_spec(dtype, args.measure_ceiling)
  if args.autotune:
    _autotune_cli(spec, impls, shapes, dtype, args, on_cpu)

  reps = args.reps if args.reps is not None else (5 if on_cpu else 50)
  rows = []
  for dims in shapes:
    for impl in impls:
      rows.append(timing.bench_one(spec, impl, dims, dtype, args.mode, warmup=args.warmup,
                                   reps=reps, device_spec=device_spec, on_cpu=on_cpu,
                                   max_interpret_size=args.max_interpret_size))
  print(tables.format_table(rows))
  for line in spec.report(rows, shapes) if spec.report else ():
    print(line)
  if args.json:
    tables.write_json(rows, args.json)
  if args.plot:
    try:
      tables.plot(rows, args.plot)
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"# plot written to {args.plot}")
  return 0


def _lower_cli(spec: specs.OpSpec, shapes, dtype, mode) -> int:
  if "triton" not in spec.implementations:
    print(f"--lower: --op={spec.name} has no triton implementation")
    return 1
  failed = 0
  for dims in shapes:
    args, diff = spec.make_inputs(dims, dtype, jax.random.key(0))
    fn = timing.build_fn(spec, "triton", mode, diff, False)
    if mode == "fwd_bwd":
      args = (timing.cotangent(spec, args),) + args
    t0 = time.perf_counter()
    try:
      text = lower_for_cuda(fn, *timing.abstract(args))
      n = text.count(TRITON_CUSTOM_CALL)
      print(f"{spec.name} {'x'.join(map(str, dims))} {jnp.dtype(dtype).name} {mode}: lowered "
            f"for cuda, {n} Triton custom call(s), {time.perf_counter() - t0:.1f} s")
      failed += n == 0
    except Exception as e:  # noqa: BLE001
      failed += 1
      print(f"{spec.name} {'x'.join(map(str, dims))}: FAILED {type(e).__name__}: {e}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

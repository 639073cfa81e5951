"""What an op's benchmark spec holds (``OpSpec``), where each op's spec lives, and shape parsing.

Each op keeps its spec beside its kernels, in ``kernels/<op>/bench_spec.py``: inputs, the call
per implementation, analytic FLOP and byte counts, the problem size, and optional autotuning
and report hooks. That module holds ``SPECS = {op name: OpSpec}``; ``SPEC_MODULES`` below names
it. The harness imports a spec module on first use, by name, as the ops' ``IMPLEMENTATIONS``
tables do: the spec modules import this one, so this one cannot import them at its top.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16,
          "float16": jnp.float16, "f32": jnp.float32, "float32": jnp.float32}
MODES = ("fwd", "fwd_bwd")

# op name -> the module (relative to this package) whose ``SPECS`` holds its spec.
SPEC_MODULES = {
    "softmax": "..softmax.bench_spec",
    "layer_norm": "..norms.bench_spec",
    "rms_norm": "..norms.bench_spec",
    "linear_cross_entropy": "..cross_entropy.bench_spec",
    "attention": "..attention.bench_spec",
}


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One op as the bench tool sees it.

  ``make_inputs(dims, dtype, key) -> (args, diff)``: the arguments and the indices of those
  the backward differentiates. ``run(impl, args, interpret) -> output``. ``flops(dims, mode)``
  and ``bytes(dims, dtype, mode)``: algorithmic counts. ``size(dims)``: problem size for plots
  and the interpret-mode limit (``size_doc`` says what it counts). ``tuning_problems(dims,
  dtype, interpret) -> (triton module, {kind: (make(config) -> fn, inputs)})`` for the Triton
  kernels ``--autotune`` sweeps (None: nothing to tune); ``mosaic_gpu_sweeps(dims, dtype,
  interpret) -> [Sweep]`` the same for the Mosaic GPU kernels, whose modules name their cache
  keys and candidates themselves. ``report(rows, shapes)``: extra lines printed after the table.
  """
  name: str
  shape_doc: str
  ndims: int
  default_shapes: tuple[str, ...]
  implementations: tuple[str, ...]
  make_inputs: Callable[[tuple, Any, jax.Array], tuple[tuple, tuple[int, ...]]]
  run: Callable[..., Any]
  flops: Callable[[tuple, str], float]
  bytes: Callable[[tuple, Any, str], float]
  size: Callable[[tuple], int]
  size_doc: str
  memory_bound: bool
  tuning_problems: Callable[..., tuple[Any, dict]] | None = None
  report: Callable[[Sequence[dict], Sequence[tuple]], list[str]] | None = None
  mosaic_gpu_sweeps: Callable[..., list["Sweep"]] | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One kernel's autotuning sweep: time ``make(config)(*inputs)`` for each candidate and store
  the fastest as ``as_dict(config)`` under cache op name ``key`` at shape ``dims`` (the key and
  shape the kernel looks up at trace time, e.g. ``"rms_norm.mosaic_gpu.fwd"``, ``(N, D)``)."""
  key: str
  dims: tuple
  candidates: Sequence[Any]
  make: Callable[[Any], Callable]
  inputs: tuple
  as_dict: Callable[[Any], dict] = dict


def fwd_bwd_sweeps(key: str, dims, dtype, mod, call, args: tuple, cotangent, **kw) -> list[Sweep]:
  """The two sweeps (``<key>.fwd``, ``<key>.bwd``) of a Mosaic GPU module whose
  ``autotune_candidates(kind, dims, dtype, **kw)`` and ``heuristic_config(...)`` return configs
  with ``as_dict()``, and whose op takes ``config={"fwd": ..., "bwd": ...}``: ``call(*args,
  config=...)``. The kernel not swept keeps its heuristic config; the bwd sweep times forward +
  VJP with ``cotangent`` (the forward is the same for every candidate, so the order is the
  backward's)."""
  heur = {k: mod.heuristic_config(k, dims, dtype, **kw) for k in ("fwd", "bwd")}

  def make(kind):
    def build(cfg):
      f = lambda *a: call(*a, config={**heur, kind: cfg})
      return f if kind == "fwd" else (lambda g, *a: jax.vjp(f, *a)[1](g))
    return build
  def candidates(kind):  # the heuristic first: the baseline, also under --max-configs
    rest = mod.autotune_candidates(kind, dims, dtype, **kw)
    return [heur[kind]] + [c for c in rest if c != heur[kind]]
  return [Sweep(f"{key}.{kind}", tuple(dims), candidates(kind), make(kind),
                tuple(args) if kind == "fwd" else (cotangent,) + tuple(args),
                as_dict=lambda c: c.as_dict())
          for kind in ("fwd", "bwd")]


def names() -> list[str]:
  return sorted(SPEC_MODULES)


def get(name: str) -> OpSpec:
  """The spec of op ``name`` (imports its ``bench_spec`` module on first use)."""
  return importlib.import_module(SPEC_MODULES[name], __package__).SPECS[name]


def itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def normal(key, shape, dtype, scale=1.0):
  """Standard normal samples times ``scale``, drawn in float32 and cast to ``dtype``."""
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def parse_shapes(spec: OpSpec, text: str) -> list[tuple[int, ...]]:
  """``"64x100,8x1000"`` -> ``[(64, 100), (8, 1000)]``, checked against the op's rank."""
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

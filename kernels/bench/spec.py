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
  kernels ``--autotune`` sweeps (None: nothing to tune). ``report(rows, shapes)``: extra lines
  printed after the table.
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

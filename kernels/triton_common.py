"""Helpers the Pallas Triton kernels share: tile addressing, launch configs, lowering for CUDA.

* Tile addressing (``idx2``, ``at2``, ``at1``, ``load2``, ``load1``, ``store2``, ``store1``):
  masked loads and stores of a ``[rows, cols]`` tile or a vector at a start offset.
* Launch configs (``compiler_params``, ``valid_config``, ``resolve_config``, ``split_config``):
  each op's ``triton.py`` owns its heuristic and its sweep; the way an explicit config, the
  autotune cache and the heuristic combine is the same for every op.
* ``lower_for_cuda``: export a function holding Triton kernels for CUDA from any machine (tests
  and ``python -m kernels.bench --lower`` use it to check the kernels compile without a GPU).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from . import autotune

# The custom call that carries a Pallas Triton kernel in a module lowered for CUDA.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


# ---------------------------------------------------------------- tile addressing

# Tiles are addressed with integer index arrays rather than ``pl.ds`` slices: a slice
# larger than the array (a block wider than a short row) is rejected at trace time by
# jax >= 0.12, while index arrays lower to the same Triton pointer arithmetic and are
# masked at the edges (``mask``/``other``).
def idx2(r0, br, c0, bc):
  """Index arrays of the ``[br, bc]`` tile at row ``r0``, column ``c0``."""
  return (r0 + jnp.arange(br))[:, None], (c0 + jnp.arange(bc))[None, :]


def at2(ref, r0, br, c0, bc):
  return ref.at[idx2(r0, br, c0, bc)]


def at1(ref, start, size):
  return ref.at[start + jnp.arange(size)]


def load2(ref, r0, br, c0, bc, mask, other=0.0):
  """The ``[br, bc]`` tile at (``r0``, ``c0``); ``other`` where ``mask`` is False."""
  return plgpu.load(at2(ref, r0, br, c0, bc), mask=mask, other=other)


def load1(ref, start, size, mask, other=0.0):
  """``size`` elements from ``start``; ``other`` where ``mask`` is False."""
  return plgpu.load(at1(ref, start, size), mask=mask, other=other)


def store2(ref, r0, br, c0, bc, value, mask):
  """Stores ``value``, cast to the ref's dtype, into the tile where ``mask`` is True."""
  plgpu.store(at2(ref, r0, br, c0, bc), value.astype(ref.dtype), mask=mask)


def store1(ref, start, size, value, mask):
  plgpu.store(at1(ref, start, size), value.astype(ref.dtype), mask=mask)


# ---------------------------------------------------------------- launch configs

def compiler_params(config: Mapping[str, Any]):
  """``pallas_call(compiler_params=...)`` from a config's ``num_warps`` and ``num_stages``."""
  return plgpu.CompilerParams(num_warps=config["num_warps"], num_stages=config["num_stages"])


def _power_of_2(v, least: int) -> bool:
  return isinstance(v, int) and v >= least and (v & (v - 1)) == 0


def valid_config(cfg: Mapping[str, Any], *, pow2: Sequence[str], counts: Sequence[str] = (),
                 min_block: int = 1) -> bool:
  """True when the ``pow2`` keys are powers of two >= ``min_block`` and the ``counts`` keys
  present are ints >= 1 (a config from the cache is checked before a kernel trusts it)."""
  return (all(_power_of_2(cfg[k], min_block) for k in pow2)
          and all(isinstance(cfg[k], int) and cfg[k] >= 1 for k in counts if k in cfg))


def resolve_config(op: str, kind: str, dims, dtype, config, *,
                   heuristic: Callable[[str, Any, Any], dict],
                   valid: Callable[[Mapping[str, Any]], bool], drop: Sequence[str] = (),
                   hint: str | None = None) -> dict:
  """Launch config of kernel ``kind`` ("fwd"/"bwd") of ``op`` at ``dims``.

  An explicit ``config`` wins (missing keys from the heuristic, ``drop`` keys removed: they
  belong to the other kernel); else the autotune cache entry ``<op>.<kind>``; else
  ``heuristic(kind, dims, dtype)``.
  """
  if config is not None:
    cfg = {**heuristic(kind, dims, dtype), **dict(config)}
    for key in drop:
      cfg.pop(key, None)
    if not valid(cfg):
      raise ValueError(f"{op} triton config {cfg} is not valid" + (f" ({hint})" if hint else ""))
    return cfg
  return autotune.get_config(f"{op}.{kind}", dims, dtype, lambda: heuristic(kind, dims, dtype),
                             validate=valid)


def split_config(config):
  """``(fwd, bwd)`` from one config for both kernels or ``{"fwd": {...}, "bwd": {...}}``."""
  if config is not None and "fwd" in config:
    return config.get("fwd"), config.get("bwd")
  return config, config


# ---------------------------------------------------------------- lowering

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
          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)],
      )(*args)
  return exported.mlir_module()

"""Softmax as Pallas Mosaic GPU (``plgpu``) kernels, forward and backward (``jax.custom_vjp``).

The input is viewed as ``[rows, cols]`` (softmax axes moved last and flattened). Masked
entries (``where`` False) become ``-inf`` and the array is padded with ``-inf`` to
``[rows_p, cols_p]`` (multiples of ``block_rows`` / ``block_cols``) outside the
``custom_vjp``, so padding gets probability 0 and a row with nothing allowed gets zeros
(and zero gradient). Each kernel instance (grid ``(rows_p / block_rows,)``, one
warpgroup) owns ``block_rows`` rows and sweeps their ``block_cols``-wide column blocks with
a TMA pipeline (``emit_pipeline``, ``stages`` blocks in flight); row statistics are float32
in the WGMMA register layout (64-row tiles).

* Forward: a row that fits one column block is read once; a longer row is swept twice
  (an online max/sum, then the write of ``exp(z - max) / sum``).
* Backward: ``scale * p * (g - sum(p * g))`` from the saved probabilities, one sweep or two
  the same way.

Dtypes: float32, bfloat16, float16. Needs JAX >= 0.11 (``mosaic_gpu_common``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import mosaic_gpu_common as mgc

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # JAX < 0.11 without absl: every entry point raises version_error first
  pl = plgpu = None

_F32 = jnp.float32
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes of one kernel: rows per instance, columns per pipeline step, steps in flight."""
  block_rows: int = 64
  block_cols: int = 256
  stages: int = 2

  def as_dict(self):
    return dataclasses.asdict(self)


def smem_bytes(kind: str, cfg: Config, dtype) -> int:
  """Shared memory the kernel allocates: pipeline slots (1 or 2 inputs) + the output ring."""
  tile = cfg.block_rows * cfg.block_cols * jnp.dtype(dtype).itemsize
  return cfg.stages * tile * (1 if kind == "fwd" else 2) + 2 * tile + 64


def config_problem(kind, cfg: Config, dtype) -> str | None:
  if cfg.block_rows not in (64, 128):
    return f"block_rows={cfg.block_rows} must be 64 or 128 (WGMMA register layout)"
  if cfg.block_cols % 64 or not 64 <= cfg.block_cols <= 256:
    return f"block_cols={cfg.block_cols} must be a multiple of 64 in [64, 256] (TMA box)"
  if cfg.stages not in (1, 2, 3, 4):
    return f"stages={cfg.stages} must be 1..4"
  if smem_bytes(kind, cfg, dtype) > mgc.MAX_SMEM_BYTES:
    return f"needs {smem_bytes(kind, cfg, dtype)} B of shared memory > {mgc.MAX_SMEM_BYTES}"
  return None


def heuristic_config(kind: str, dims, dtype) -> Config:
  """128-column blocks (64 float32 registers per thread per [64, 128] tile) or the whole row
  when it is shorter; two blocks in flight."""
  del kind, dtype
  _, cols = dims
  return Config(64, min(128, mgc.round_up(cols, 64)), 2)


def autotune_candidates(kind: str, dims, dtype) -> list[Config]:
  """Block sizes x pipeline depth the autotuner sweeps (only those that fit shared memory)."""
  _, cols = dims
  out = []
  for br in (64, 128):
    for bc in (64, 128, 256):  # powers of two: fwd and bwd blocks pad to their lcm
      if bc > mgc.round_up(cols, 64):
        continue
      for stages in (1, 2, 3):
        if config_problem(kind, Config(br, bc, stages), dtype) is None:
          out.append(Config(br, bc, stages))
  return out


# The configs CI gates (interpret numerics + export for cuda), at every dtype.
SHIPPED_CONFIGS = (Config(64, 128, 2), Config(128, 64, 2))


def resolve_config(kind: str, dims, dtype, config=None) -> Config:
  """Explicit config, else the autotune cache ``softmax.mosaic_gpu.<kind>``, else heuristic."""
  return mgc.resolve_config("softmax", f"softmax.mosaic_gpu.{kind}", Config, dims, dtype, config,
                            lambda: heuristic_config(kind, dims, dtype),
                            lambda cfg: config_problem(kind, cfg, dtype))


def unsupported(x) -> str | None:
  """Why this input cannot run here (dtype), or None."""
  if jnp.dtype(x.dtype) not in [jnp.dtype(t) for t in DTYPES]:
    return f"dtype {jnp.dtype(x.dtype).name} is not supported (float32, bfloat16, float16)"
  return None


# ---------------------------------------------------------------- kernels

def _load(ref):
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(_F32)


def _rows(v, shape):  # per-row vector [br] -> [br, bc]
  return lax.broadcast_in_dim(v, shape, [0])


def _row_full(br, value):
  return plgpu.layout_cast(jnp.full((br,), value, _F32), plgpu.Layout.WGMMA.reduce(1))


def _finite(m):  # a row with nothing allowed has max -inf: use 0 so exp(-inf - 0) = 0
  return jnp.where(m == -jnp.inf, 0.0, m)


def _fwd_kernel(x_ref, p_ref, ring, *, scale, cfg, nc):
  br, bc = cfg.block_rows, cfg.block_cols
  i = lax.axis_index("r")
  rows = pl.ds(i * br, br)
  spec = plgpu.BlockSpec((br, bc), lambda j: (i, j))
  scaled = lambda xs: _load(xs) * scale if scale != 1.0 else _load(xs)
  stats = {}

  if nc > 1:  # online max / sum sweep; the write sweep reads the row again
    def stats_step(idx, xs, carry):
      m, s = carry
      z = scaled(xs)
      m_new = jnp.maximum(m, jnp.max(z, axis=1))
      m_safe = _finite(m_new)
      s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - _rows(m_safe, z.shape)), axis=1)
      return m_new, s

    m, s = mgc.pipeline(stats_step, grid=(nc,), in_specs=[spec], stages=cfg.stages,
                        init_carry=(_row_full(br, -jnp.inf), _row_full(br, 0.0)))(x_ref)
    stats.update(m=_finite(m), inv=1.0 / jnp.where(s == 0.0, 1.0, s))

  def write_step(idx, xs):
    z = scaled(xs)
    if nc == 1:
      m = _finite(jnp.max(z, axis=1))
      e = jnp.exp(z - _rows(m, z.shape))
      s = jnp.sum(e, axis=1)
      p = e * _rows(1.0 / jnp.where(s == 0.0, 1.0, s), z.shape)
    else:
      p = jnp.exp(z - _rows(stats["m"], z.shape)) * _rows(stats["inv"], z.shape)
    mgc.store_tiles(idx[0], [(ring, p, p_ref.at[rows, pl.ds(idx[0] * bc, bc)])])

  mgc.pipeline(write_step, grid=(nc,), in_specs=[spec], stages=cfg.stages)(x_ref)
  plgpu.wait_smem_to_gmem(0)


def _bwd_kernel(p_ref, g_ref, dx_ref, ring, *, scale, cfg, nc):
  br, bc = cfg.block_rows, cfg.block_cols
  i = lax.axis_index("r")
  rows = pl.ds(i * br, br)
  spec = plgpu.BlockSpec((br, bc), lambda j: (i, j))
  dots = {}

  if nc > 1:
    def dot_step(idx, ps, gs, carry):
      return carry + jnp.sum(_load(ps) * _load(gs), axis=1)

    dots["dot"] = mgc.pipeline(dot_step, grid=(nc,), in_specs=[spec, spec], stages=cfg.stages,
                               init_carry=_row_full(br, 0.0))(p_ref, g_ref)

  def write_step(idx, ps, gs):
    p, g = _load(ps), _load(gs)
    dot = jnp.sum(p * g, axis=1) if nc == 1 else dots["dot"]
    dx = scale * p * (g - _rows(dot, p.shape))
    mgc.store_tiles(idx[0], [(ring, dx, dx_ref.at[rows, pl.ds(idx[0] * bc, bc)])])

  mgc.pipeline(write_step, grid=(nc,), in_specs=[spec, spec], stages=cfg.stages)(p_ref, g_ref)
  plgpu.wait_smem_to_gmem(0)


def _call(body, cfg, interpret, *arrays, scale):
  rows_p, cols_p = arrays[0].shape
  br, bc = cfg.block_rows, cfg.block_cols
  return plgpu.kernel(
      functools.partial(body, scale=scale, cfg=cfg, nc=cols_p // bc),
      out_type=jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype),
      grid=(rows_p // br,), grid_names=("r",),
      scratch_types=[plgpu.SMEM((2, br, bc), arrays[0].dtype)],
      compiler_params=mgc.warpgroup_params(), **mgc.kernel_kwargs(interpret))(*arrays)


def forward(xp, *, scale: float, config: Config, interpret: bool = False):
  """Raw forward on padded ``[rows_p, cols_p]`` (``-inf`` padding): probabilities."""
  return _call(_fwd_kernel, config, interpret, xp, scale=scale)


def backward(p, g, *, scale: float, config: Config, interpret: bool = False):
  """Raw backward on padded arrays: ``scale * p * (g - sum(p * g))``."""
  return _call(_bwd_kernel, config, interpret, p, g, scale=scale)


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _softmax2(xp, scale, fwd_cfg, bwd_cfg, interpret):
  return forward(xp, scale=scale, config=fwd_cfg, interpret=interpret)


def _softmax2_fwd(xp, scale, fwd_cfg, bwd_cfg, interpret):
  p = forward(xp, scale=scale, config=fwd_cfg, interpret=interpret)
  return p, p


def _softmax2_bwd(scale, fwd_cfg, bwd_cfg, interpret, p, g):
  return (backward(p, g.astype(p.dtype), scale=scale, config=bwd_cfg, interpret=interpret),)


_softmax2.defvjp(_softmax2_fwd, _softmax2_bwd)


def softmax(x, where=None, *, axis=(-1,), scale=1.0, interpret=False, config=None):
  """Softmax over ``axis`` (a tuple of normalised axes) with Mosaic GPU kernels.

  ``config``: a :class:`Config`, a dict of its fields, or ``{"fwd": ..., "bwd": ...}``;
  by default the autotune cache or the heuristic decide.
  """
  mgc.check_available("softmax", bool(interpret))
  problem = unsupported(x)
  if problem:
    raise ValueError(f"softmax mosaic_gpu: {problem}")
  nd = x.ndim
  axes = tuple(sorted(a % nd for a in axis))
  moved = tuple(range(nd - len(axes), nd))
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)
  xt = jnp.moveaxis(x, axes, moved) if axes != moved else x
  cols = math.prod(xt.shape[nd - len(axes):])
  rows = math.prod(xt.shape[:nd - len(axes)])
  fwd_c, bwd_c = (config.get("fwd"), config.get("bwd")) if (
      isinstance(config, dict) and "fwd" in config) else (config, config)
  fwd_cfg = resolve_config("fwd", (rows, cols), x.dtype, fwd_c)
  bwd_cfg = resolve_config("bwd", (rows, cols), x.dtype, bwd_c)
  # Both kernels see the same padded array: pad to a multiple of both configs' blocks.
  rows_p = mgc.round_up(rows, math.lcm(fwd_cfg.block_rows, bwd_cfg.block_rows))
  cols_p = mgc.round_up(cols, math.lcm(fwd_cfg.block_cols, bwd_cfg.block_cols))
  xp = mgc.pad2(xt.reshape(rows, cols), rows_p, cols_p, -jnp.inf)
  out = _softmax2(xp, float(scale), fwd_cfg, bwd_cfg, bool(interpret))
  out = out[:rows, :cols].reshape(xt.shape)
  return jnp.moveaxis(out, moved, axes) if axes != moved else out

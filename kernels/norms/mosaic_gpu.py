"""Layer norm and RMS norm as Pallas Mosaic GPU (``plgpu``) kernels, forward and backward.

``x`` is viewed as ``[n, d]`` and padded outside the ``custom_vjp`` with zeros to
``[n_p, d_p]`` (``n_p`` a multiple of ``block_rows``, ``d_p`` of ``block_cols``); the
scale and offset get zero padding too. Each kernel instance (grid ``(n_p / block_rows,)``,
one warpgroup) owns ``block_rows`` rows and sweeps their ``block_cols``-wide column blocks
with a TMA pipeline (``emit_pipeline``, ``stages`` blocks in flight). Row statistics are
float32, in the WGMMA register layout (64-row tiles), so ``block_rows`` is 64 or 128.

* Forward: a row that fits one column block is read once; a longer row is swept twice
  (statistics, merged per block with Chan's formula for the layer-norm variance, then the
  write). Writes ``y`` plus per-row ``mean`` / ``rstd`` for the backward.
* Backward: the same one- or two-sweep scheme computes the row terms ``mean(wdy * xhat)``
  and ``mean(wdy)`` and writes ``dx`` and each row block's column sums ``sum(dy * xhat)``
  and ``sum(dy)`` (``[n_p / block_rows, d_p]`` float32 partials, summed by XLA).

With ``xhat = (x - mean) * rstd`` and ``wdy = dy * scale``:
``dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))`` (RMS norm: no centring, no
``mean(wdy)`` term). The ``k = d_p - d`` zero columns add ``k * mean**2`` to the centred sum
of squares (removed exactly) and nothing to the other sums (their ``dy`` and scale are 0).

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


def smem_bytes(kind: str, cfg: Config, dtype, centered: bool = True) -> int:
  """Shared memory the kernel allocates (pipeline slots, output rings, statistics)."""
  isz = jnp.dtype(dtype).itemsize
  tile, vec = cfg.block_rows * cfg.block_cols * isz, cfg.block_cols * isz
  n_vec = 2 if centered else 1
  if kind == "fwd":
    return cfg.stages * (tile + n_vec * vec) + 2 * tile + 2 * cfg.block_rows * 4
  return (cfg.stages * (2 * tile + vec) + 2 * tile + 2 * n_vec * cfg.block_cols * 4
          + 2 * cfg.block_rows * 4 + 64)


def config_problem(kind, cfg: Config, dtype, centered: bool = True) -> str | None:
  if cfg.block_rows not in (64, 128):
    return f"block_rows={cfg.block_rows} must be 64 or 128 (WGMMA register layout)"
  if cfg.block_cols % 64 or not 64 <= cfg.block_cols <= 256:
    return f"block_cols={cfg.block_cols} must be a multiple of 64 in [64, 256] (TMA box)"
  if cfg.stages not in (1, 2, 3, 4):
    return f"stages={cfg.stages} must be 1..4"
  if smem_bytes(kind, cfg, dtype, centered) > mgc.MAX_SMEM_BYTES:
    return (f"needs {smem_bytes(kind, cfg, dtype, centered)} B of shared memory > "
            f"{mgc.MAX_SMEM_BYTES}")
  return None


def heuristic_config(kind: str, dims, dtype, centered: bool = True) -> Config:
  """128-column blocks (64 float32 registers per thread per [64, 128] tile: the backward holds
  several) or the whole row when it is shorter; two blocks in flight."""
  del kind, dtype, centered
  _, d = dims
  return Config(64, min(128, mgc.round_up(d, 64)), 2)


def autotune_candidates(kind: str, dims, dtype, centered: bool = True) -> list[Config]:
  """Block sizes x pipeline depth the autotuner sweeps (only those that fit shared memory)."""
  _, d = dims
  out = []
  for br in (64, 128):
    for bc in (64, 128, 256):  # powers of two: fwd and bwd blocks pad to their lcm
      if bc > mgc.round_up(d, 64):
        continue
      for stages in (1, 2, 3):
        cfg = Config(br, bc, stages)
        if config_problem(kind, cfg, dtype, centered) is None:
          out.append(cfg)
  return out


# The configs CI gates (interpret numerics + export for cuda), at every dtype.
SHIPPED_CONFIGS = (Config(64, 128, 2), Config(128, 64, 2))


def resolve_config(op: str, kind: str, dims, dtype, config=None) -> Config:
  """Explicit config, else the autotune cache ``<op>.mosaic_gpu.<kind>``, else heuristic."""
  centered = op == "layer_norm"
  return mgc.resolve_config(op, f"{op}.mosaic_gpu.{kind}", Config, dims, dtype, config,
                            lambda: heuristic_config(kind, dims, dtype, centered),
                            lambda cfg: config_problem(kind, cfg, dtype, centered))


def unsupported(x, *params) -> str | None:
  """Why these arguments cannot run here (dtype), or None."""
  for a in (x,) + params:
    if a is not None and jnp.dtype(a.dtype) not in [jnp.dtype(t) for t in DTYPES]:
      return f"dtype {jnp.dtype(a.dtype).name} is not supported (float32, bfloat16, float16)"
  return None


# ---------------------------------------------------------------- kernels

def _wgmma():
  return plgpu.Layout.WGMMA


def _load(ref, layout=None):
  return plgpu.load(ref, layout=layout or _wgmma()).astype(_F32)


def _rows(v, shape):  # per-row vector [br] -> [br, bc]
  return lax.broadcast_in_dim(v, shape, [0])


def _cols(v, shape):  # per-column vector [bc] -> [br, bc]
  return lax.broadcast_in_dim(v, shape, [1])


def _row_zeros(br):
  return plgpu.layout_cast(jnp.zeros((br,), _F32), _wgmma().reduce(1))


def _moments(xv, d, d_p, centered):
  """Row mean and variance of a whole padded row held in one tile."""
  if not centered:
    return None, jnp.sum(xv * xv, axis=1) / d
  mean = jnp.sum(xv, axis=1) / d
  xc = xv - _rows(mean, xv.shape)
  return mean, (jnp.sum(xc * xc, axis=1) - (d_p - d) * mean * mean) / d


def _fwd_kernel(*refs, d, d_p, eps, cfg, centered):
  if centered:
    x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, ring, mean_s, rstd_s = refs
  else:
    x_ref, w_ref, y_ref, rstd_ref, ring, rstd_s = refs
    b_ref = mean_ref = mean_s = None
  br, bc, nc = cfg.block_rows, cfg.block_cols, d_p // cfg.block_cols
  i = lax.axis_index("r")
  rows = pl.ds(i * br, br)
  x_spec = plgpu.BlockSpec((br, bc), lambda j: (i, j))
  v_spec = plgpu.BlockSpec((bc,), lambda j: (j,))
  stats = {}

  if nc > 1:  # statistics sweep; the write sweep below reads the row again
    def stats_step(idx, xs, carry):
      xv = _load(xs)
      if not centered:
        return carry + jnp.sum(xv * xv, axis=1)
      mean_a, m2_a = carry
      cm = jnp.sum(xv, axis=1) / bc
      xc = xv - _rows(cm, xv.shape)
      m2_c = jnp.sum(xc * xc, axis=1)
      n_a = (idx[0] * bc).astype(_F32)
      frac = bc / (n_a + bc)
      delta = cm - mean_a  # Chan et al.: merge block moments without cancellation
      return mean_a + delta * frac, m2_a + m2_c + delta * delta * n_a * frac

    init = (_row_zeros(br), _row_zeros(br)) if centered else _row_zeros(br)
    out = mgc.pipeline(stats_step, grid=(nc,), in_specs=[x_spec], stages=cfg.stages,
                       init_carry=init)(x_ref)
    if centered:
      mean_p, m2_p = out  # over d_p columns, zeros included
      mean = mean_p * (d_p / d)
      var = (m2_p - (d * (d_p - d) / d_p) * mean * mean) / d
    else:
      mean, var = None, out / d
    stats.update(mean=mean, rstd=lax.rsqrt(var + eps))

  def write_step(idx, xs, ws, *bs):
    xv = _load(xs)
    if nc == 1:
      mean, var = _moments(xv, d, d_p, centered)
      stats.update(mean=mean, rstd=lax.rsqrt(var + eps))
    mean, rstd = stats["mean"], stats["rstd"]
    xc = xv - _rows(mean, xv.shape) if centered else xv
    y = xc * _rows(rstd, xv.shape) * _cols(_load(ws, _wgmma().reduce(0)), xv.shape)
    if centered:
      y = y + _cols(_load(bs[0], _wgmma().reduce(0)), xv.shape)
    mgc.store_tiles(idx[0], [(ring, y, y_ref.at[rows, pl.ds(idx[0] * bc, bc)])])
    if nc == 1:
      rstd_s[...] = rstd
      if centered:
        mean_s[...] = mean

  in_refs = (x_ref, w_ref) + ((b_ref,) if centered else ())
  mgc.pipeline(write_step, grid=(nc,), in_specs=[x_spec] + [v_spec] * (len(in_refs) - 1),
               stages=cfg.stages)(*in_refs)
  if nc > 1:
    rstd_s[...] = stats["rstd"]
    if centered:
      mean_s[...] = stats["mean"]
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(rstd_s, rstd_ref.at[rows])
  if centered:
    plgpu.copy_smem_to_gmem(mean_s, mean_ref.at[rows])
  plgpu.wait_smem_to_gmem(0)


def _bwd_kernel(*refs, d, cfg, d_p, centered):
  if centered:
    (x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref,
     dx_ring, dw_ring, db_ring, mean_s, rstd_s, bar) = refs
  else:
    x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref, dx_ring, dw_ring, rstd_s, bar = refs
  br, bc, nc = cfg.block_rows, cfg.block_cols, d_p // cfg.block_cols
  i = lax.axis_index("r")
  rows = pl.ds(i * br, br)
  plgpu.copy_gmem_to_smem(rstd_ref.at[rows], rstd_s, bar)
  if centered:
    plgpu.copy_gmem_to_smem(mean_ref.at[rows], mean_s, bar)
  plgpu.barrier_wait(bar)
  rstd = _load(rstd_s, _wgmma().reduce(1))
  mean = _load(mean_s, _wgmma().reduce(1)) if centered else None
  t_spec = plgpu.BlockSpec((br, bc), lambda j: (i, j))
  v_spec = plgpu.BlockSpec((bc,), lambda j: (j,))
  specs = [t_spec, v_spec, t_spec]

  def terms(xs, ws, dys):
    xv, dyv = _load(xs), _load(dys)
    xc = xv - _rows(mean, xv.shape) if centered else xv
    xhat = xc * _rows(rstd, xv.shape)
    return xhat, dyv, dyv * _cols(_load(ws, _wgmma().reduce(0)), xv.shape)

  def row_sums(xhat, wdy):
    return jnp.sum(wdy * xhat, axis=1), (jnp.sum(wdy, axis=1) if centered else None)

  sums = {}
  if nc > 1:
    def sums_step(idx, xs, ws, dys, carry):
      xhat, _, wdy = terms(xs, ws, dys)
      s1, s2 = row_sums(xhat, wdy)
      return (carry[0] + s1, carry[1] + s2) if centered else carry + s1

    init = (_row_zeros(br), _row_zeros(br)) if centered else _row_zeros(br)
    out = mgc.pipeline(sums_step, grid=(nc,), in_specs=specs, stages=cfg.stages,
                       init_carry=init)(x_ref, w_ref, dy_ref)
    sums.update(s1=out[0], s2=out[1]) if centered else sums.update(s1=out, s2=None)

  def write_step(idx, xs, ws, dys):
    xhat, dyv, wdy = terms(xs, ws, dys)
    if nc == 1:
      sums["s1"], sums["s2"] = row_sums(xhat, wdy)
    shape = xhat.shape
    g = wdy - xhat * _rows(sums["s1"] / d, shape)
    if centered:
      g = g - _rows(sums["s2"] / d, shape)
    cols = pl.ds(idx[0] * bc, bc)
    tiles = [(dx_ring, g * _rows(rstd, shape), dx_ref.at[rows, cols]),
             (dw_ring, jnp.sum(dyv * xhat, axis=0), dw_ref.at[i, cols])]
    if centered:
      tiles.append((db_ring, jnp.sum(dyv, axis=0), db_ref.at[i, cols]))
    mgc.store_tiles(idx[0], tiles)

  mgc.pipeline(write_step, grid=(nc,), in_specs=specs, stages=cfg.stages)(x_ref, w_ref, dy_ref)
  plgpu.wait_smem_to_gmem(0)


def forward(x2, w, b, *, eps: float, d: int, config: Config, interpret: bool = False):
  """Raw forward on padded ``[n_p, d_p]``: ``(y, mean or None, rstd)`` (stats float32 [n_p])."""
  n_p, d_p = x2.shape
  centered = b is not None
  br, bc = config.block_rows, config.block_cols
  f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
  outs = (jax.ShapeDtypeStruct(x2.shape, x2.dtype),) + ((f32(n_p),) if centered else ()) + (
      f32(n_p),)
  scratch = [plgpu.SMEM((2, br, bc), x2.dtype)] + [plgpu.SMEM((br,), _F32)] * (
      2 if centered else 1)
  kernel = plgpu.kernel(
      functools.partial(_fwd_kernel, d=d, d_p=d_p, eps=eps, cfg=config, centered=centered),
      out_type=outs, grid=(n_p // br,), grid_names=("r",), scratch_types=scratch,
      compiler_params=mgc.warpgroup_params(),
      **mgc.kernel_kwargs(interpret))
  if centered:
    y, mean, rstd = kernel(x2, w, b)
    return y, mean, rstd
  y, rstd = kernel(x2, w)
  return y, None, rstd


def backward(x2, w, dy, mean, rstd, *, d: int, config: Config, interpret: bool = False):
  """Raw backward on padded arrays: ``(dx, dscale_f32, doffset_f32 or None)``."""
  n_p, d_p = x2.shape
  centered = mean is not None
  br, bc = config.block_rows, config.block_cols
  part = jax.ShapeDtypeStruct((n_p // br, d_p), _F32)
  outs = (jax.ShapeDtypeStruct(x2.shape, x2.dtype), part) + ((part,) if centered else ())
  n_stats = 2 if centered else 1
  scratch = ([plgpu.SMEM((2, br, bc), x2.dtype)] + [plgpu.SMEM((2, bc), _F32)] * n_stats
             + [plgpu.SMEM((br,), _F32)] * n_stats + [plgpu.Barrier(num_arrivals=n_stats)])
  kernel = plgpu.kernel(
      functools.partial(_bwd_kernel, d=d, d_p=d_p, cfg=config, centered=centered),
      out_type=outs, grid=(n_p // br,), grid_names=("r",), scratch_types=scratch,
      compiler_params=mgc.warpgroup_params(),
      **mgc.kernel_kwargs(interpret))
  stats = (mean, rstd) if centered else (rstd,)
  dx, dw, *db = kernel(x2, w, dy, *stats)
  return dx, jnp.sum(dw, axis=0), (jnp.sum(db[0], axis=0) if centered else None)


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _norm2(x2, w, b, eps, d, fwd_cfg, bwd_cfg, interpret):
  return forward(x2, w, b, eps=eps, d=d, config=fwd_cfg, interpret=interpret)[0]


def _norm2_fwd(x2, w, b, eps, d, fwd_cfg, bwd_cfg, interpret):
  y, mean, rstd = forward(x2, w, b, eps=eps, d=d, config=fwd_cfg, interpret=interpret)
  return y, (x2, w, b, mean, rstd)


def _norm2_bwd(eps, d, fwd_cfg, bwd_cfg, interpret, res, dy):
  x2, w, b, mean, rstd = res
  dx, dw, db = backward(x2, w, dy.astype(x2.dtype), mean, rstd, d=d, config=bwd_cfg,
                        interpret=interpret)
  return dx, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_norm2.defvjp(_norm2_fwd, _norm2_bwd)


def _run(op, x, scale, offset, eps, interpret, config, centered):
  mgc.check_available(op, bool(interpret))
  problem = unsupported(x, scale, offset)
  if problem:
    raise ValueError(f"{op} mosaic_gpu: {problem}")
  d = x.shape[-1]
  n = math.prod(x.shape[:-1])
  fwd_c, bwd_c = (config.get("fwd"), config.get("bwd")) if (
      isinstance(config, dict) and "fwd" in config) else (config, config)
  fwd_cfg = resolve_config(op, "fwd", (n, d), x.dtype, fwd_c)
  bwd_cfg = resolve_config(op, "bwd", (n, d), x.dtype, bwd_c)
  # Both kernels see the same padded array: pad to the larger blocks (a multiple of both).
  br = math.lcm(fwd_cfg.block_rows, bwd_cfg.block_rows)
  bc = math.lcm(fwd_cfg.block_cols, bwd_cfg.block_cols)
  n_p, d_p = mgc.round_up(n, br), mgc.round_up(d, bc)
  x2 = mgc.pad2(x.reshape(n, d), n_p, d_p)
  pad_vec = lambda v: jnp.pad(v, (0, d_p - d))
  w = pad_vec(jnp.ones((d,), x.dtype) if scale is None else scale.astype(x.dtype))
  b = None
  if centered:
    b = pad_vec(jnp.zeros((d,), x.dtype) if offset is None else offset.astype(x.dtype))
  y = _norm2(x2, w, b, float(eps), d, fwd_cfg, bwd_cfg, bool(interpret))
  return y[:n, :d].reshape(x.shape)


def layer_norm(x, scale, offset, *, epsilon=1e-6, interpret=False, config=None):
  """Layer norm over the last axis with Mosaic GPU kernels (see module docstring).

  ``config``: a :class:`Config`, a dict of its fields, or ``{"fwd": ..., "bwd": ...}``.
  """
  return _run("layer_norm", x, scale, offset, epsilon, interpret, config, centered=True)


def rms_norm(x, scale, *, epsilon=1e-6, interpret=False, config=None):
  """RMS norm over the last axis with Mosaic GPU kernels (see module docstring)."""
  return _run("rms_norm", x, scale, None, epsilon, interpret, config, centered=False)

"""Layer norm and RMS norm as Pallas Triton kernels, forward and backward.

``x`` is viewed as ``[n, d]`` and normalised over ``d``; statistics are float32.

* Forward: each program normalises ``block_rows`` rows. A row that fits one
  ``block_cols`` block is read once; a longer row is swept in blocks (mean, variance,
  write). The kernel also writes ``mean`` and ``rstd`` per row for the backward.
* Backward, row fits one block: one fused kernel over ``row_groups`` programs; each
  walks its rows, writes ``dx`` and keeps running column sums for ``dscale`` and
  ``doffset`` in registers, stored as one partial row per program (summed by XLA).
* Backward, longer rows: a ``dx`` kernel (two sweeps per row) and a ``dscale/doffset``
  kernel over a (column block, row group) grid.

Gradients: with ``xhat = (x - mean) * rstd`` and ``wdy = dy * scale``,
``dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))`` (RMS norm: no ``mean(wdy)``
term and no centring), ``dscale = sum_rows(dy * xhat)``, ``doffset = sum_rows(dy)``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .. import autotune
from .. import triton_common as tc

_F32 = jnp.float32
_MAX_SINGLE_BLOCK = 8192


# ---------------------------------------------------------------- configs

def heuristic_config(kind: str, dims, dtype) -> dict:
  del dtype
  n, d = dims
  p2 = autotune.next_power_of_2(d)
  bd = p2 if p2 <= _MAX_SINGLE_BLOCK else 4096
  br = max(1, min(4096 // bd, autotune.next_power_of_2(max(1, n // 264))))
  num_warps = min(max(br * bd // 512, 1), 8)
  cfg = {"block_rows": br, "block_cols": bd, "num_warps": num_warps,
         "num_stages": 1 if bd >= d else 2}
  if kind == "bwd":
    cfg["row_groups"] = 264  # ~2 programs per SM on H100-class parts
  return cfg


def candidate_configs(kind: str, dims, dtype) -> list[dict]:
  n, d = dims
  top = autotune.next_power_of_2(d)
  col_opts = sorted({top} if top <= _MAX_SINGLE_BLOCK else {2048, 4096})
  out = []
  for bd in col_opts:
    for br in (1, 2, 4, 8, 16, 32):
      if br * bd > 16384 or br > autotune.next_power_of_2(n):
        continue
      for nw in (2, 4, 8, 16):
        if nw * 32 > br * bd:
          continue
        for ns in ((1,) if bd >= d else (1, 2)):
          base = {"block_rows": br, "block_cols": bd, "num_warps": nw, "num_stages": ns}
          if kind == "bwd":
            for groups in (132, 264, 528):
              out.append({**base, "row_groups": groups})
          else:
            out.append(base)
  return out


def _valid(cfg) -> bool:
  return tc.valid_config(cfg, pow2=("block_rows", "block_cols", "num_warps"),
                         counts=("num_stages", "row_groups"))


def resolve_config(op: str, kind: str, dims, dtype, config=None) -> dict:
  """Explicit config, else autotune cache ``<op>.<kind>``, else heuristic."""
  return tc.resolve_config(op, kind, dims, dtype, config, heuristic=heuristic_config,
                           valid=_valid, drop=("row_groups",) if kind == "fwd" else ())


# ---------------------------------------------------------------- kernels

def _tile(ref, row0, c0, br, bc, mask):
  return tc.load2(ref, row0, br, c0, bc, mask).astype(_F32)


def _vec(ref, start, size, mask):
  return tc.load1(ref, start, size, mask).astype(_F32)


def _fwd_kernel(*refs, n, d, eps, br, bd, centered):
  if centered:
    x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref = refs
  else:
    x_ref, w_ref, y_ref, rstd_ref = refs
  row0 = pl.program_id(0) * br
  rows_ok = (row0 + jnp.arange(br)) < n

  def masks(c0):
    cols_ok = (c0 + jnp.arange(bd)) < d
    return cols_ok, rows_ok[:, None] & cols_ok[None, :]

  def write(c0, xc, rstd):
    cols_ok, inb = masks(c0)
    y = xc * rstd[:, None] * _vec(w_ref, c0, bd, cols_ok)[None, :]
    if centered:
      y = y + _vec(b_ref, c0, bd, cols_ok)[None, :]
    tc.store2(y_ref, row0, br, c0, bd, y, inb)

  n_blocks = pl.cdiv(d, bd)
  if n_blocks == 1:
    _, inb = masks(0)
    x = _tile(x_ref, row0, 0, br, bd, inb)
    if centered:
      mean = jnp.sum(x, axis=1) / d
      x = jnp.where(inb, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
    write(0, x, rstd)
  else:
    if centered:
      def sum_body(j, acc):
        return acc + jnp.sum(_tile(x_ref, row0, j * bd, br, bd, masks(j * bd)[1]), axis=1)
      mean = lax.fori_loop(0, n_blocks, sum_body, jnp.zeros((br,), _F32)) / d
    else:
      mean = jnp.zeros((br,), _F32)

    def var_body(j, acc):
      _, inb = masks(j * bd)
      xc = jnp.where(inb, _tile(x_ref, row0, j * bd, br, bd, inb) - mean[:, None], 0.0)
      return acc + jnp.sum(xc * xc, axis=1)

    rstd = lax.rsqrt(lax.fori_loop(0, n_blocks, var_body, jnp.zeros((br,), _F32)) / d + eps)

    def write_body(j, carry):
      _, inb = masks(j * bd)
      write(j * bd, _tile(x_ref, row0, j * bd, br, bd, inb) - mean[:, None], rstd)
      return carry

    lax.fori_loop(0, n_blocks, write_body, 0)
  if centered:
    tc.store1(mean_ref, row0, br, mean, rows_ok)
  tc.store1(rstd_ref, row0, br, rstd, rows_ok)


def _load_stats(mean_ref, rstd_ref, row0, br, rows_ok, centered):
  rstd = _vec(rstd_ref, row0, br, rows_ok)
  mean = _vec(mean_ref, row0, br, rows_ok) if centered else jnp.zeros((br,), _F32)
  return mean, rstd


def _bwd_fused_kernel(*refs, n, d, br, bd, rpg, centered):
  """Row fits one block: dx plus per-program partial column sums."""
  if centered:
    x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref = refs
  else:
    x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref = refs
    mean_ref = db_ref = None
  g = pl.program_id(0)
  cols_ok = jnp.arange(bd) < d
  w = _vec(w_ref, 0, bd, cols_ok)

  def body(k, acc):
    dw_acc, db_acc = acc
    row0 = g * rpg + k * br
    rows_ok = (row0 + jnp.arange(br)) < n
    inb = rows_ok[:, None] & cols_ok[None, :]
    x = _tile(x_ref, row0, 0, br, bd, inb)
    dy = _tile(dy_ref, row0, 0, br, bd, inb)
    mean, rstd = _load_stats(mean_ref, rstd_ref, row0, br, rows_ok, centered)
    xhat = jnp.where(inb, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w[None, :]
    dx = wdy - xhat * (jnp.sum(xhat * wdy, axis=1) / d)[:, None]
    if centered:
      dx = dx - (jnp.sum(wdy, axis=1) / d)[:, None]
    dx = dx * rstd[:, None]
    tc.store2(dx_ref, row0, br, 0, bd, dx, inb)
    return dw_acc + jnp.sum(dy * xhat, axis=0), db_acc + jnp.sum(dy, axis=0)

  zeros = jnp.zeros((bd,), _F32)
  dw_acc, db_acc = lax.fori_loop(0, rpg // br, body, (zeros, zeros))
  tc.store2(dw_ref, g, 1, 0, bd, dw_acc[None, :], cols_ok[None, :])
  if centered:
    tc.store2(db_ref, g, 1, 0, bd, db_acc[None, :], cols_ok[None, :])


def _bwd_dx_kernel(*refs, n, d, br, bd, centered):
  """Long rows: two sweeps per row block (the two means, then dx)."""
  if centered:
    x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref = refs
  else:
    x_ref, w_ref, dy_ref, rstd_ref, dx_ref = refs
    mean_ref = None
  row0 = pl.program_id(0) * br
  rows_ok = (row0 + jnp.arange(br)) < n
  mean, rstd = _load_stats(mean_ref, rstd_ref, row0, br, rows_ok, centered)

  def load(c0):
    cols_ok = (c0 + jnp.arange(bd)) < d
    inb = rows_ok[:, None] & cols_ok[None, :]
    x = _tile(x_ref, row0, c0, br, bd, inb)
    wdy = _tile(dy_ref, row0, c0, br, bd, inb) * _vec(w_ref, c0, bd, cols_ok)[None, :]
    xhat = jnp.where(inb, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, wdy, inb

  def sums(j, acc):
    c1, c2 = acc
    xhat, wdy, _ = load(j * bd)
    return c1 + jnp.sum(xhat * wdy, axis=1), c2 + jnp.sum(wdy, axis=1)

  zeros = jnp.zeros((br,), _F32)
  c1, c2 = lax.fori_loop(0, pl.cdiv(d, bd), sums, (zeros, zeros))
  c1, c2 = c1 / d, c2 / d

  def write(j, carry):
    xhat, wdy, inb = load(j * bd)
    dx = wdy - xhat * c1[:, None]
    if centered:
      dx = dx - c2[:, None]
    dx = dx * rstd[:, None]
    tc.store2(dx_ref, row0, br, j * bd, bd, dx, inb)
    return carry

  lax.fori_loop(0, pl.cdiv(d, bd), write, 0)


def _bwd_dwdb_kernel(*refs, n, d, br, bd, rpg, centered):
  """Long rows: partial column sums over one row group for one column block."""
  if centered:
    x_ref, dy_ref, mean_ref, rstd_ref, dw_ref, db_ref = refs
  else:
    x_ref, dy_ref, rstd_ref, dw_ref = refs
    mean_ref = db_ref = None
  j, g = pl.program_id(0), pl.program_id(1)
  c0 = j * bd
  cols_ok = (c0 + jnp.arange(bd)) < d

  def body(k, acc):
    dw_acc, db_acc = acc
    row0 = g * rpg + k * br
    rows_ok = (row0 + jnp.arange(br)) < n
    inb = rows_ok[:, None] & cols_ok[None, :]
    mean, rstd = _load_stats(mean_ref, rstd_ref, row0, br, rows_ok, centered)
    xhat = jnp.where(inb, (_tile(x_ref, row0, c0, br, bd, inb) - mean[:, None]) * rstd[:, None],
                     0.0)
    dy = _tile(dy_ref, row0, c0, br, bd, inb)
    return dw_acc + jnp.sum(dy * xhat, axis=0), db_acc + jnp.sum(dy, axis=0)

  zeros = jnp.zeros((bd,), _F32)
  dw_acc, db_acc = lax.fori_loop(0, rpg // br, body, (zeros, zeros))
  tc.store2(dw_ref, g, 1, c0, bd, dw_acc[None, :], cols_ok[None, :])
  if centered:
    tc.store2(db_ref, g, 1, c0, bd, db_acc[None, :], cols_ok[None, :])


# ---------------------------------------------------------------- raw calls

def forward(x2, w, b, *, eps: float, config: dict, interpret: bool = False):
  """Returns ``(y, mean, rstd)``; ``b is None`` means RMS norm (``mean`` is None)."""
  n, d = x2.shape
  centered = b is not None
  br, bd = config["block_rows"], config["block_cols"]
  kernel = functools.partial(_fwd_kernel, n=n, d=d, eps=eps, br=br, bd=bd, centered=centered)
  stat = jax.ShapeDtypeStruct((n,), _F32)
  out_shape = [jax.ShapeDtypeStruct(x2.shape, x2.dtype)] + [stat] * (2 if centered else 1)
  args = (x2, w, b) if centered else (x2, w)
  outs = pl.pallas_call(
      kernel, grid=(pl.cdiv(n, br),), out_shape=out_shape,
      compiler_params=tc.compiler_params(config), interpret=interpret,
      name="layer_norm_fwd" if centered else "rms_norm_fwd",
  )(*args)
  if centered:
    return tuple(outs)
  y, rstd = outs
  return y, None, rstd


def backward(x2, w, dy, mean, rstd, *, config: dict, interpret: bool = False):
  """Returns ``(dx, dscale_f32, doffset_f32 or None)``; ``mean is None`` means RMS norm."""
  n, d = x2.shape
  centered = mean is not None
  br, bd = config["block_rows"], config["block_cols"]
  n_row_blocks = pl.cdiv(n, br)
  groups = max(1, min(config["row_groups"], n_row_blocks))
  rpg = pl.cdiv(n_row_blocks, groups) * br  # rows per group, a multiple of br
  groups = pl.cdiv(n, rpg)
  stats = (mean, rstd) if centered else (rstd,)
  part = jax.ShapeDtypeStruct((groups, d), _F32)
  n_parts = 2 if centered else 1
  name = "layer_norm" if centered else "rms_norm"
  if d <= bd:
    kernel = functools.partial(_bwd_fused_kernel, n=n, d=d, br=br, bd=bd, rpg=rpg,
                               centered=centered)
    dx, *parts = pl.pallas_call(
        kernel, grid=(groups,), out_shape=[jax.ShapeDtypeStruct(x2.shape, x2.dtype)]
        + [part] * n_parts, compiler_params=tc.compiler_params(config), interpret=interpret,
        name=f"{name}_bwd",
    )(x2, w, dy, *stats)
  else:
    kernel = functools.partial(_bwd_dx_kernel, n=n, d=d, br=br, bd=bd, centered=centered)
    dx = pl.pallas_call(
        kernel, grid=(n_row_blocks,), out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=tc.compiler_params(config), interpret=interpret,
        name=f"{name}_bwd_dx",
    )(x2, w, dy, *stats)
    kernel = functools.partial(_bwd_dwdb_kernel, n=n, d=d, br=br, bd=bd, rpg=rpg,
                               centered=centered)
    parts = pl.pallas_call(
        kernel, grid=(pl.cdiv(d, bd), groups), out_shape=[part] * n_parts,
        compiler_params=tc.compiler_params(config), interpret=interpret,
        name=f"{name}_bwd_dscale",
    )(x2, dy, *stats)
  dw = jnp.sum(parts[0], axis=0)
  db = jnp.sum(parts[1], axis=0) if centered else None
  return dx, dw, db


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm2(x2, w, b, eps, fwd_cfg, bwd_cfg, interpret):
  return forward(x2, w, b, eps=eps, config=dict(fwd_cfg), interpret=interpret)[0]


def _norm2_fwd(x2, w, b, eps, fwd_cfg, bwd_cfg, interpret):
  y, mean, rstd = forward(x2, w, b, eps=eps, config=dict(fwd_cfg), interpret=interpret)
  return y, (x2, w, b, mean, rstd)


def _norm2_bwd(eps, fwd_cfg, bwd_cfg, interpret, res, dy):
  x2, w, b, mean, rstd = res
  dx, dw, db = backward(x2, w, dy.astype(x2.dtype), mean, rstd, config=dict(bwd_cfg),
                        interpret=interpret)
  return dx, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_norm2.defvjp(_norm2_fwd, _norm2_bwd)


def _run(op, x, scale, offset, eps, interpret, config, centered):
  d = x.shape[-1]
  n = math.prod(x.shape[:-1])
  x2 = x.reshape(n, d)
  dims = (n, d)
  fwd_c, bwd_c = tc.split_config(config)
  fwd_cfg = resolve_config(op, "fwd", dims, x.dtype, fwd_c)
  bwd_cfg = resolve_config(op, "bwd", dims, x.dtype, bwd_c)
  w = jnp.ones((d,), x.dtype) if scale is None else scale
  b = None
  if centered:
    b = jnp.zeros((d,), x.dtype) if offset is None else offset
  y = _norm2(x2, w, b, float(eps), autotune.freeze(fwd_cfg), autotune.freeze(bwd_cfg),
             bool(interpret))
  return y.reshape(x.shape)


def layer_norm(x, scale, offset, *, epsilon=1e-6, interpret=False, config=None):
  """Layer norm over the last axis with Pallas Triton kernels (see module docstring)."""
  return _run("layer_norm", x, scale, offset, epsilon, interpret, config, centered=True)


def rms_norm(x, scale, *, epsilon=1e-6, interpret=False, config=None):
  """RMS norm over the last axis with Pallas Triton kernels (see module docstring)."""
  return _run("rms_norm", x, scale, None, epsilon, interpret, config, centered=False)

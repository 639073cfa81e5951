"""Softmax as Pallas Triton kernels, forward and backward (``jax.custom_vjp``).

The input is viewed as ``[rows, cols]`` (softmax axes moved last and flattened). Each
program takes ``block_rows`` rows. A row that fits one ``block_cols`` block is read
once; a longer row is swept in blocks twice: an online max/sum pass, then a pass that
writes ``exp(x - max) / sum``. The backward reads the saved probabilities ``p`` and the
cotangent ``g`` and writes ``scale * p * (g - sum(p * g))`` the same way.

Masked entries (``where`` False) count as ``-inf``; a row with nothing allowed gets
zeros, and zero gradient.
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
_MAX_TILE = 16384  # elements of a [block_rows, block_cols] float32 tile kept in registers


# ---------------------------------------------------------------- configs

def heuristic_config(kind: str, dims, dtype) -> dict:
  """Launch parameters for a [rows, cols] problem when the cache has none."""
  del kind
  rows, cols = dims
  max_cols = 8192 if jnp.dtype(dtype).itemsize <= 2 else 4096
  block_cols = min(autotune.next_power_of_2(cols), max_cols)
  # Several short rows per program, but keep >= ~2 waves of programs on big GPUs.
  block_rows = max(1, min(4096 // block_cols, autotune.next_power_of_2(max(1, rows // 264))))
  tile = block_rows * block_cols
  num_warps = min(max(tile // 512, 1), 8)
  return {"block_rows": block_rows, "block_cols": block_cols, "num_warps": num_warps,
          "num_stages": 2 if cols > block_cols else 1}


def candidate_configs(kind: str, dims, dtype) -> list[dict]:
  """The autotuning sweep for one shape (block sizes, warps, stages)."""
  rows, cols = dims
  top = autotune.next_power_of_2(cols)
  col_opts = sorted({min(top, c) for c in (1024, 2048, 4096, 8192)})
  out = []
  for bc in col_opts:
    for br in (1, 2, 4, 8, 16, 32, 64):
      if br * bc > _MAX_TILE or br > autotune.next_power_of_2(rows):
        continue
      for nw in (1, 4, 8, 16):
        if nw * 32 > br * bc:  # more threads than elements
          continue
        for ns in ((1,) if bc >= cols else (1, 2)):
          out.append({"block_rows": br, "block_cols": bc, "num_warps": nw, "num_stages": ns})
  return out


def _valid(cfg) -> bool:
  return tc.valid_config(cfg, pow2=("block_rows", "block_cols", "num_warps"),
                         counts=("num_stages",))


def resolve_config(kind: str, dims, dtype, config=None) -> dict:
  """Explicit config, else the autotune cache (``softmax.fwd``/``softmax.bwd``), else heuristic."""
  return tc.resolve_config("softmax", kind, dims, dtype, config, heuristic=heuristic_config,
                           valid=_valid, hint="powers of two expected")


# ---------------------------------------------------------------- kernels

def _fwd_kernel(x_ref, *refs, rows, cols, scale, br, bc, has_mask):
  if has_mask:
    m_ref, o_ref = refs
  else:
    (o_ref,) = refs
  row0 = pl.program_id(0) * br
  rows_ok = (row0 + jnp.arange(br)) < rows

  def load(c0):
    inb = rows_ok[:, None] & ((c0 + jnp.arange(bc)) < cols)[None, :]
    z = tc.load2(x_ref, row0, br, c0, bc, inb, 0.0).astype(_F32)
    if scale != 1.0:
      z = z * scale
    ok = inb
    if has_mask:
      ok = ok & (tc.load2(m_ref, row0, br, c0, bc, inb, 0) != 0)
    return jnp.where(ok, z, -jnp.inf), inb

  def store(c0, p, inb):
    tc.store2(o_ref, row0, br, c0, bc, p, inb)

  n_blocks = pl.cdiv(cols, bc)
  if n_blocks == 1:
    z, inb = load(0)
    m = jnp.max(z, axis=1)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(z - m[:, None])
    s = jnp.sum(e, axis=1)
    store(0, e / jnp.where(s == 0.0, 1.0, s)[:, None], inb)
    return

  def stats(j, carry):
    m, s = carry
    z, _ = load(j * bc)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
    return m_new, s

  m, s = lax.fori_loop(0, n_blocks, stats,
                       (jnp.full((br,), -jnp.inf, _F32), jnp.zeros((br,), _F32)))
  m = jnp.where(m == -jnp.inf, 0.0, m)
  inv = 1.0 / jnp.where(s == 0.0, 1.0, s)

  def write(j, carry):
    z, inb = load(j * bc)
    store(j * bc, jnp.exp(z - m[:, None]) * inv[:, None], inb)
    return carry

  lax.fori_loop(0, n_blocks, write, 0)


def _bwd_kernel(p_ref, g_ref, dx_ref, *, rows, cols, scale, br, bc):
  row0 = pl.program_id(0) * br
  rows_ok = (row0 + jnp.arange(br)) < rows

  def load(c0):
    inb = rows_ok[:, None] & ((c0 + jnp.arange(bc)) < cols)[None, :]
    p = tc.load2(p_ref, row0, br, c0, bc, inb, 0.0).astype(_F32)
    g = tc.load2(g_ref, row0, br, c0, bc, inb, 0.0).astype(_F32)
    return p, g, inb

  def store(c0, dx, inb):
    tc.store2(dx_ref, row0, br, c0, bc, dx, inb)

  n_blocks = pl.cdiv(cols, bc)
  if n_blocks == 1:
    p, g, inb = load(0)
    dot = jnp.sum(p * g, axis=1)
    store(0, scale * p * (g - dot[:, None]), inb)
    return

  def acc(j, dot):
    p, g, _ = load(j * bc)
    return dot + jnp.sum(p * g, axis=1)

  dot = lax.fori_loop(0, n_blocks, acc, jnp.zeros((br,), _F32))

  def write(j, carry):
    p, g, inb = load(j * bc)
    store(j * bc, scale * p * (g - dot[:, None]), inb)
    return carry

  lax.fori_loop(0, n_blocks, write, 0)


def forward(x2, mask2, *, scale: float, config: dict, interpret: bool = False):
  """Raw forward kernel on ``[rows, cols]``; ``mask2`` is an int8 array or None."""
  rows, cols = x2.shape
  br, bc = config["block_rows"], config["block_cols"]
  kernel = functools.partial(_fwd_kernel, rows=rows, cols=cols, scale=scale, br=br, bc=bc,
                             has_mask=mask2 is not None)
  args = (x2,) if mask2 is None else (x2, mask2)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(rows, br),),
      out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
      compiler_params=tc.compiler_params(config), interpret=interpret, name="softmax_fwd",
  )(*args)


def backward(p2, g2, *, scale: float, config: dict, interpret: bool = False):
  """Raw backward kernel: ``scale * p * (g - sum(p * g))`` on ``[rows, cols]``."""
  rows, cols = p2.shape
  br, bc = config["block_rows"], config["block_cols"]
  kernel = functools.partial(_bwd_kernel, rows=rows, cols=cols, scale=scale, br=br, bc=bc)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(rows, br),),
      out_shape=jax.ShapeDtypeStruct(p2.shape, p2.dtype),
      compiler_params=tc.compiler_params(config), interpret=interpret, name="softmax_bwd",
  )(p2, g2)


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _softmax2(x2, mask2, scale, fwd_cfg, bwd_cfg, interpret):
  return forward(x2, mask2, scale=scale, config=dict(fwd_cfg), interpret=interpret)


def _softmax2_fwd(x2, mask2, scale, fwd_cfg, bwd_cfg, interpret):
  p = forward(x2, mask2, scale=scale, config=dict(fwd_cfg), interpret=interpret)
  return p, p


def _softmax2_bwd(scale, fwd_cfg, bwd_cfg, interpret, p, g):
  dx = backward(p, g.astype(p.dtype), scale=scale, config=dict(bwd_cfg), interpret=interpret)
  return dx, None


_softmax2.defvjp(_softmax2_fwd, _softmax2_bwd)


def softmax(x, where=None, *, axis=(-1,), scale=1.0, interpret=False, config=None):
  """Softmax over ``axis`` (a tuple of normalised axes) with Pallas Triton kernels.

  ``config`` may be a dict (applied to forward and backward) or
  ``{"fwd": {...}, "bwd": {...}}``; by default the autotune cache or heuristics decide.
  """
  nd = x.ndim
  axes = tuple(sorted(a % nd for a in axis))
  moved = tuple(range(nd - len(axes), nd))
  xt = jnp.moveaxis(x, axes, moved) if axes != moved else x
  lead = xt.shape[:nd - len(axes)]
  cols = math.prod(xt.shape[nd - len(axes):])
  rows = math.prod(lead)
  x2 = xt.reshape(rows, cols)
  mask2 = None
  if where is not None:
    w = jnp.broadcast_to(where, x.shape)
    w = jnp.moveaxis(w, axes, moved) if axes != moved else w
    mask2 = w.reshape(rows, cols).astype(jnp.int8)
  fwd_c, bwd_c = tc.split_config(config)
  dims = (rows, cols)
  fwd_cfg = resolve_config("fwd", dims, x.dtype, fwd_c)
  bwd_cfg = resolve_config("bwd", dims, x.dtype, bwd_c)
  out = _softmax2(x2, mask2, float(scale), autotune.freeze(fwd_cfg), autotune.freeze(bwd_cfg),
                  bool(interpret))
  out = out.reshape(xt.shape)
  return jnp.moveaxis(out, moved, axes) if axes != moved else out

"""Linear cross-entropy as Pallas Triton kernels; the ``[N, V]`` logits never reach memory.

Forward kernel, grid ``(token blocks, vocab splits)``: a program takes ``block_n`` tokens
and one of ``v_splits`` contiguous ranges of the vocabulary. For each ``block_v``
vocabulary block it computes the ``[block_n, block_v]`` logits tile with a loop of
``block_d`` dot products, and folds it into an online max/sum, the label logit and the
logit sum. XLA combines the per-split partials into ``lse`` (cheap: ``[v_splits, N]``).

Backward kernel, grid ``(token blocks, vocab blocks)``: each program recomputes its
logits tile, forms ``dloss/dlogits`` from the saved ``lse``, and atomically adds
``dlogits @ weight_blk.T`` into a float32 ``dx`` and ``x_blk.T @ dlogits`` into a float32
``dweight`` (both padded to whole blocks so atomics need no mask). Gradients are
therefore accumulated in float32 in a nondeterministic order. The ``dweight`` atomics
move ``(N / block_n) * D * V * 4`` bytes: larger ``block_n`` trades them for fewer
programs (the autotuner's main lever).

Matmul inputs stay in the input dtype (bf16 on tensor cores), accumulation is float32.
Block sizes must be powers of two >= 16 (Triton's dot).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import autotune
from .. import triton_common as tc
from .reference import loss_from_stats

_F32 = jnp.float32


# ---------------------------------------------------------------- configs

def heuristic_config(kind: str, dims, dtype) -> dict:
  n, d, v = dims
  small = jnp.dtype(dtype).itemsize <= 2
  bn = min(64, max(16, autotune.next_power_of_2(n)))
  bv = min(128, max(16, autotune.next_power_of_2(v)))
  bd = min(64 if small else 32, max(16, autotune.next_power_of_2(d)))
  cfg = {"block_n": bn, "block_v": bv, "block_d": bd, "num_warps": 4, "num_stages": 3}
  if kind == "fwd":
    # Enough programs for ~2 waves on a 132-SM part, but at least 4 vocab blocks per split.
    programs = autotune.cdiv(n, bn)
    cfg["v_splits"] = int(max(1, min(autotune.cdiv(264, programs), autotune.cdiv(v, 4 * bv))))
  return cfg


def candidate_configs(kind: str, dims, dtype) -> list[dict]:
  n, d, v = dims
  out = []
  for bn in (32, 64, 128):
    for bv in (64, 128, 256):
      for bd in (32, 64):
        if bd > max(16, autotune.next_power_of_2(d)) or bn * bv > 16384 or bn * bv < 4096:
          continue
        for nw in (4, 8):
          for ns in (3, 4):
            base = {"block_n": bn, "block_v": bv, "block_d": bd, "num_warps": nw,
                    "num_stages": ns}
            if kind == "fwd":
              programs = autotune.cdiv(n, bn)
              for target in (132, 264):
                splits = max(1, min(autotune.cdiv(target, programs), autotune.cdiv(v, 2 * bv)))
                out.append({**base, "v_splits": int(splits)})
            else:
              out.append(base)
  # de-duplicate (v_splits may coincide)
  seen, uniq = set(), []
  for c in out:
    key = autotune.freeze(c)
    if key not in seen:
      seen.add(key)
      uniq.append(c)
  return uniq


def _valid(cfg) -> bool:
  return tc.valid_config(cfg, pow2=("block_n", "block_v", "block_d"), min_block=16,
                         counts=("num_warps", "num_stages", "v_splits"))


def resolve_config(kind: str, dims, dtype, config=None) -> dict:
  """Explicit config, else autotune cache ``linear_cross_entropy.<kind>``, else heuristic."""
  return tc.resolve_config("linear_cross_entropy", kind, dims, dtype, config,
                           heuristic=heuristic_config, valid=_valid,
                           drop=("v_splits",) if kind == "bwd" else (),
                           hint="block sizes: powers of two >= 16")


# ---------------------------------------------------------------- kernels

def _xw_tiles(x_ref, w_ref, row0, v0, d0, rows_ok, cols_ok, *, d, bn, bv, bd):
  """The ``[bn, bd]`` tile of ``x`` and the ``[bd, bv]`` tile of ``w`` at depth ``d0``."""
  d_ok = (d0 + jnp.arange(bd)) < d
  xt = tc.load2(x_ref, row0, bn, d0, bd, rows_ok[:, None] & d_ok[None, :])
  wt = tc.load2(w_ref, d0, bd, v0, bv, d_ok[:, None] & cols_ok[None, :])
  return xt, wt


def _logits_tile(x_ref, w_ref, row0, v0, rows_ok, cols_ok, *, d, bn, bv, bd):
  """``x[row0:row0+bn] @ w[:, v0:v0+bv]`` in float32, zero outside the arrays."""

  def body(k, acc):
    xt, wt = _xw_tiles(x_ref, w_ref, row0, v0, k * bd, rows_ok, cols_ok, d=d, bn=bn, bv=bv,
                       bd=bd)
    return acc + jnp.dot(xt, wt, preferred_element_type=_F32)

  return lax.fori_loop(0, pl.cdiv(d, bd), body, jnp.zeros((bn, bv), _F32))


def _fwd_kernel(x_ref, w_ref, lab_ref, m_ref, s_ref, ll_ref, sl_ref, *, n, d, v, bn, bv, bd,
                blocks_per_split, smoothing):
  i, sp = pl.program_id(0), pl.program_id(1)
  row0 = i * bn
  rows_ok = (row0 + jnp.arange(bn)) < n
  labels = tc.load1(lab_ref, row0, bn, rows_ok, -1)

  def vocab_step(jb, carry):
    m, s, ll, sl = carry
    v0 = (sp * blocks_per_split + jb) * bv
    cols = v0 + jnp.arange(bv)
    cols_ok = cols < v
    z = _logits_tile(x_ref, w_ref, row0, v0, rows_ok, cols_ok, d=d, bn=bn, bv=bv, bd=bd)
    zm = jnp.where(cols_ok[None, :], z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(zm, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(zm - m_safe[:, None]), axis=1)
    ll = ll + jnp.sum(jnp.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    if smoothing:
      sl = sl + jnp.sum(jnp.where(cols_ok[None, :], z, 0.0), axis=1)
    return m_new, s, ll, sl

  init = (jnp.full((bn,), -jnp.inf, _F32),) + (jnp.zeros((bn,), _F32),) * 3
  outs = lax.fori_loop(0, blocks_per_split, vocab_step, init)
  for ref, val in zip((m_ref, s_ref, ll_ref, sl_ref), outs):
    tc.store2(ref, sp, 1, row0, bn, val[None, :], rows_ok[None, :])


def _bwd_kernel(x_ref, w_ref, lab_ref, lse_ref, gs_ref, dx_in, dw_in, dx_ref, dw_ref, *, n, d, v,
                bn, bv, bd, smoothing, z_loss):
  del dx_in, dw_in  # aliased to dx_ref / dw_ref (zero-initialised accumulators)
  i, j = pl.program_id(0), pl.program_id(1)
  row0, v0 = i * bn, j * bv
  rows_ok = (row0 + jnp.arange(bn)) < n
  cols = v0 + jnp.arange(bv)
  cols_ok = cols < v
  labels = tc.load1(lab_ref, row0, bn, rows_ok, -1)
  lse = tc.load1(lse_ref, row0, bn, rows_ok)
  gs = tc.load1(gs_ref, row0, bn, rows_ok)
  z = _logits_tile(x_ref, w_ref, row0, v0, rows_ok, cols_ok, d=d, bn=bn, bv=bv, bd=bd)
  dz = jnp.exp(z - lse[:, None]) * ((1.0 + 2.0 * z_loss * lse) * gs)[:, None]
  dz = dz - jnp.where(cols[None, :] == labels[:, None], ((1.0 - smoothing) * gs)[:, None], 0.0)
  if smoothing:
    dz = dz - ((smoothing / v) * gs)[:, None]
  dz = jnp.where(rows_ok[:, None] & cols_ok[None, :], dz, 0.0).astype(x_ref.dtype)

  def d_step(k, carry):
    d0 = k * bd
    xt, wt = _xw_tiles(x_ref, w_ref, row0, v0, d0, rows_ok, cols_ok, d=d, bn=bn, bv=bv, bd=bd)
    plgpu.atomic_add(dx_ref, tc.idx2(row0, bn, d0, bd),
                     jnp.dot(dz, wt.T, preferred_element_type=_F32))
    plgpu.atomic_add(dw_ref, tc.idx2(d0, bd, v0, bv),
                     jnp.dot(xt.T, dz, preferred_element_type=_F32))
    return carry

  lax.fori_loop(0, pl.cdiv(d, bd), d_step, 0)


# ---------------------------------------------------------------- raw calls

def forward(x, w, labels, *, smoothing: float, config: dict, interpret: bool = False):
  """Returns per-token ``(lse, label_logit, logit_sum)`` in float32."""
  n, d = x.shape
  v = w.shape[1]
  bn, bv, bd = config["block_n"], config["block_v"], config["block_d"]
  n_vblocks = pl.cdiv(v, bv)
  splits = max(1, min(config["v_splits"], n_vblocks))
  per_split = pl.cdiv(n_vblocks, splits)
  splits = pl.cdiv(n_vblocks, per_split)
  kernel = functools.partial(_fwd_kernel, n=n, d=d, v=v, bn=bn, bv=bv, bd=bd,
                             blocks_per_split=per_split, smoothing=bool(smoothing))
  part = jax.ShapeDtypeStruct((splits, n), _F32)
  m, s, ll, sl = pl.pallas_call(
      kernel, grid=(pl.cdiv(n, bn), splits), out_shape=[part] * 4,
      compiler_params=tc.compiler_params(config), interpret=interpret,
      name="linear_cross_entropy_fwd",
  )(x, w, labels)
  mx = jnp.max(m, axis=0)
  mx = jnp.where(mx == -jnp.inf, 0.0, mx)
  lse = mx + jnp.log(jnp.sum(s * jnp.exp(m - mx[None, :]), axis=0))
  return lse, jnp.sum(ll, axis=0), jnp.sum(sl, axis=0)


def backward(x, w, labels, lse, gs, *, smoothing: float, z_loss: float, config: dict,
             interpret: bool = False):
  """``(dx, dweight)`` in float32 for per-token cotangents ``gs`` (0 for ignored tokens)."""
  n, d = x.shape
  v = w.shape[1]
  bn, bv, bd = config["block_n"], config["block_v"], config["block_d"]
  grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
  dx0 = jnp.zeros((grid[0] * bn, pl.cdiv(d, bd) * bd), _F32)
  dw0 = jnp.zeros((pl.cdiv(d, bd) * bd, grid[1] * bv), _F32)
  kernel = functools.partial(_bwd_kernel, n=n, d=d, v=v, bn=bn, bv=bv, bd=bd,
                             smoothing=float(smoothing), z_loss=float(z_loss))
  dx, dw = pl.pallas_call(
      kernel, grid=grid,
      out_shape=[jax.ShapeDtypeStruct(dx0.shape, _F32), jax.ShapeDtypeStruct(dw0.shape, _F32)],
      input_output_aliases={5: 0, 6: 1}, compiler_params=tc.compiler_params(config),
      interpret=interpret, name="linear_cross_entropy_bwd",
  )(x, w, labels, lse, gs, dx0, dw0)
  return dx[:n, :d], dw[:d, :v]


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _lce(x, w, labels, ignore_index, smoothing, z_loss, fwd_cfg, bwd_cfg, interpret):
  return _lce_fwd(x, w, labels, ignore_index, smoothing, z_loss, fwd_cfg, bwd_cfg, interpret)[0]


def _lce_fwd(x, w, labels, ignore_index, smoothing, z_loss, fwd_cfg, bwd_cfg, interpret):
  lse, ll, sl = forward(x, w, labels, smoothing=smoothing, config=dict(fwd_cfg),
                        interpret=interpret)
  loss = loss_from_stats(lse, ll, sl, labels != ignore_index, vocab=w.shape[1],
                         label_smoothing=smoothing, z_loss=z_loss)
  return loss, (x, w, labels, lse)


def _lce_bwd(ignore_index, smoothing, z_loss, fwd_cfg, bwd_cfg, interpret, res, g):
  x, w, labels, lse = res
  gs = jnp.where(labels != ignore_index, g.astype(_F32), 0.0)
  dx, dw = backward(x, w, labels, lse, gs, smoothing=smoothing, z_loss=z_loss,
                    config=dict(bwd_cfg), interpret=interpret)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_lce.defvjp(_lce_fwd, _lce_bwd)


def per_token_loss(x, weight, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   interpret=False, config=None):
  """``[N]`` float32 losses (0 for ignored tokens) with Pallas Triton kernels.

  ``config`` may be one dict for both kernels or ``{"fwd": {...}, "bwd": {...}}``.
  """
  fwd_c, bwd_c = tc.split_config(config)
  dims = (x.shape[0], x.shape[1], weight.shape[1])
  fwd_cfg = resolve_config("fwd", dims, x.dtype, fwd_c)
  bwd_cfg = resolve_config("bwd", dims, x.dtype, bwd_c)
  return _lce(x, weight, labels.astype(jnp.int32), int(ignore_index), float(label_smoothing),
              float(z_loss), autotune.freeze(fwd_cfg), autotune.freeze(bwd_cfg), bool(interpret))

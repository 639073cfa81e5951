"""Linear cross-entropy as Pallas Mosaic GPU (``plgpu``) kernels; every matmul is a wgmma.

The kernels compute the per-token ``lse = logsumexp(x @ weight)`` and its gradient; the
label logit ``x[n] . weight[:, label[n]]`` and (with label smoothing) the logit sum
``x[n] . sum_v weight[:, v]`` are ``[N, D]``-sized products left to XLA (and its autodiff),
so the kernels never need the labels. ``x`` / ``weight`` are padded outside the
``custom_vjp`` with zeros to whole blocks (``N_p``, ``D_p``, ``V_p``); padded vocabulary
columns are masked to ``-inf`` inside the kernels (an iota against ``V``).

* Forward, grid ``(N_p / block_n, v_splits)``: an instance takes ``block_n`` tokens and one
  of ``v_splits`` vocabulary ranges. Per ``block_v`` vocabulary block it computes the
  ``[block_n, block_v]`` logits tile as SMEM x SMEM wgmma into a float32 ``plgpu.ACC``
  (``x`` and ``weight`` blocks of depth ``block_d`` streamed by a TMA pipeline,
  ``stages`` in flight) and folds it into an online max/sum. XLA merges the split partials.
* Backward, per chunk of ``chunk_tokens`` tokens (``lax.scan``): a kernel recomputes the
  logits tiles and writes ``dlogits = exp(z - lse) * dlse`` in the input dtype
  (``[chunk, V_p]``, the only logits-sized buffer, bounded by the chunk); then two tiled
  wgmma matmul kernels give ``dx = dlogits @ weight.T`` and ``dweight += x.T @ dlogits``
  (transposed SMEM operands, float32 accumulation), with no atomics and no recomputation.

Dtypes: bfloat16 and float16 (wgmma's 16-bit operands); float32 inputs are not taken (the
op falls back to ``"triton"`` by default). Needs JAX >= 0.11 (``mosaic_gpu_common``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import autotune
from .. import mosaic_gpu_common as mgc
from .reference import loss_from_stats

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # JAX < 0.11 without absl: every entry point raises version_error first
  pl = plgpu = None

_F32 = jnp.float32
DTYPES = (jnp.bfloat16, jnp.float16)
# Tiles of the dx / dweight matmul kernels: [64 rows, 128 cols] outputs, depth 64 per step.
MM_M, MM_N, MM_K = 64, 128, 64


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Config:
  """Logits tile ``[block_n, block_v]`` (depth ``block_d`` per pipeline step, ``stages`` in
  flight); forward vocabulary splits; backward tokens per chunk (bounds the dlogits buffer)."""
  block_n: int = 64
  block_v: int = 128
  block_d: int = 64
  stages: int = 2
  v_splits: int = 1
  chunk_tokens: int = 8192

  def as_dict(self):
    return dataclasses.asdict(self)


def smem_bytes(kind: str, cfg: Config, dtype) -> int:
  """Shared memory of the largest kernel of ``kind`` (logits kernel; the bwd matmuls)."""
  isz = jnp.dtype(dtype).itemsize
  logits = cfg.stages * (cfg.block_n + cfg.block_v) * cfg.block_d * isz + 2 * cfg.block_n * 4
  if kind == "fwd":
    return logits + cfg.block_n * 4 + 64
  mm = cfg.stages * (MM_M + MM_N) * MM_K * isz + MM_M * MM_N * 4
  return max(logits + cfg.block_n * cfg.block_v * isz + 2 * cfg.block_n * 4 + 64, mm + 64)


def config_problem(kind, cfg: Config, dtype) -> str | None:
  if cfg.block_n not in (64, 128):
    return f"block_n={cfg.block_n} must be 64 or 128 (wgmma M tile)"
  if cfg.block_v not in (64, 128, 256):
    return f"block_v={cfg.block_v} must be 64, 128 or 256 (wgmma N tile)"
  if cfg.block_d not in (64, 128):
    return f"block_d={cfg.block_d} must be 64 or 128"
  if cfg.stages not in (1, 2, 3, 4) or cfg.v_splits < 1:
    return f"stages={cfg.stages} must be 1..4 and v_splits={cfg.v_splits} >= 1"
  if cfg.chunk_tokens < 128 or cfg.chunk_tokens % 128:
    return f"chunk_tokens={cfg.chunk_tokens} must be a positive multiple of 128"
  if smem_bytes(kind, cfg, dtype) > mgc.MAX_SMEM_BYTES:
    return f"needs {smem_bytes(kind, cfg, dtype)} B of shared memory > {mgc.MAX_SMEM_BYTES}"
  return None


def heuristic_config(kind: str, dims, dtype) -> Config:
  n, _, v = dims
  programs = autotune.cdiv(n, 64)
  # Enough instances for ~2 waves on a 132-SM part, at least 4 vocab blocks per split.
  splits = int(max(1, min(autotune.cdiv(264, programs), autotune.cdiv(v, 4 * 128))))
  return Config(64, 128, 64, 2, splits if kind == "fwd" else 1, default_chunk_tokens(v, dtype))


def default_chunk_tokens(v: int, dtype, budget_bytes: int = 1 << 28) -> int:
  """Tokens per backward chunk so the ``[chunk, V]`` dlogits buffer stays <= 256 MiB."""
  per_token = max(1, v) * jnp.dtype(dtype).itemsize
  return int(min(8192, max(128, budget_bytes // per_token // 128 * 128)))


def autotune_candidates(kind: str, dims, dtype) -> list[Config]:
  """Tiles x pipeline depth (x vocab splits for the forward) the autotuner sweeps."""
  n, _, v = dims
  out = []
  for bn in (64, 128):
    for bv in (64, 128, 256):
      for bd in (64, 128):
        for stages in (2, 3, 4):
          splits = {1} if kind == "bwd" else {
              int(max(1, min(autotune.cdiv(t, autotune.cdiv(n, bn)), autotune.cdiv(v, 2 * bv))))
              for t in (132, 264)}
          for sp in sorted(splits):
            cfg = Config(bn, bv, bd, stages, sp, default_chunk_tokens(v, dtype))
            if bn * bv <= 128 * 128 and config_problem(kind, cfg, dtype) is None:
              out.append(cfg)
  return out


# The configs CI gates (interpret numerics + export for cuda), bfloat16 and float16.
SHIPPED_CONFIGS = (Config(64, 128, 64, 2, 1, 8192), Config(64, 64, 128, 3, 2, 128))


def resolve_config(kind: str, dims, dtype, config=None) -> Config:
  """Explicit config, else the autotune cache ``linear_cross_entropy.mosaic_gpu.<kind>``,
  else the heuristic."""
  return mgc.resolve_config("linear_cross_entropy", f"linear_cross_entropy.mosaic_gpu.{kind}",
                            Config, dims, dtype, config,
                            lambda: heuristic_config(kind, dims, dtype),
                            lambda cfg: config_problem(kind, cfg, dtype))


def unsupported(n, d, v, dtype) -> str | None:
  """Why these arguments cannot run here (dtype), or None."""
  del n, d, v
  if jnp.dtype(dtype) not in [jnp.dtype(t) for t in DTYPES]:
    return (f"dtype {jnp.dtype(dtype).name} is not supported (bfloat16, float16: wgmma takes "
            "16-bit operands)")
  return None


# ---------------------------------------------------------------- kernels

def _mma_transforms():
  # 64 16-bit elements = one 128-byte swizzled row: the layout wgmma reads operands in.
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _row_full(br, value):
  return plgpu.layout_cast(jnp.full((br,), value, _F32), plgpu.Layout.WGMMA.reduce(1))


def _rows(v, shape):
  return lax.broadcast_in_dim(v, shape, [0])


def _wgmma_zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, _F32), plgpu.Layout.WGMMA)


def _mma(a_s, b_s, shape):
  """``a_s @ b_s`` of two SMEM tiles as one wgmma into a fresh (zeroed) float32 accumulator."""
  def scoped(acc):
    plgpu.wgmma(acc, a_s, b_s)
    plgpu.wgmma_wait(0)
    return acc[...]
  return pl.run_scoped(scoped, plgpu.ACC(shape, _F32))


def _logits(x_ref, w_ref, i, j, *, cfg, nd):
  """``x[i-block] @ w[:, j-block]`` ([block_n, block_v] float32, WGMMA layout).

  Each pipeline step is one wgmma into a fresh scoped accumulator, summed in registers. A
  kernel-level accumulator cannot be re-zeroed per vocabulary block, and one scoped around the
  pipeline shares a scope with its shared-memory buffers, which the GPU interpreter rejects
  ("Scoped allocations in MemorySpace.REGS cannot be mixed ...").
  """
  bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
  specs = [plgpu.BlockSpec((bn, bd), lambda k: (i, k), transforms=_mma_transforms()),
           plgpu.BlockSpec((bd, bv), lambda k: (k, j), transforms=_mma_transforms())]

  def step(_, xs, ws, z):
    return z + _mma(xs, ws, (bn, bv))

  return mgc.pipeline(step, grid=(nd,), in_specs=specs, stages=cfg.stages,
                      init_carry=_wgmma_zeros((bn, bv)))(x_ref, w_ref)


def _masked(z, j, *, bv, v):
  cols = plgpu.broadcasted_iota(jnp.int32, z.shape, 1, layout=plgpu.Layout.WGMMA) + j * bv
  return jnp.where(cols < v, z, -jnp.inf)


def _fwd_kernel(x_ref, w_ref, m_ref, s_ref, m_s, s_s, *, cfg, v, nd, per_split):
  bn, bv = cfg.block_n, cfg.block_v
  i, sp = lax.axis_index("n"), lax.axis_index("s")

  def vocab_step(jb, carry):
    m, s = carry
    j = sp * per_split + jb
    z = _masked(_logits(x_ref, w_ref, i, j, cfg=cfg, nd=nd), j, bv=bv, v=v)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a split of padding only
    s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - _rows(m_safe, z.shape)), axis=1)
    return m_new, s

  m, s = lax.fori_loop(0, per_split, vocab_step, (_row_full(bn, -jnp.inf), _row_full(bn, 0.0)))
  m_s[...] = m
  s_s[...] = s
  plgpu.commit_smem()
  rows = pl.ds(i * bn, bn)
  plgpu.copy_smem_to_gmem(m_s, m_ref.at[sp, rows])
  plgpu.copy_smem_to_gmem(s_s, s_ref.at[sp, rows])
  plgpu.wait_smem_to_gmem(0)


def _dlogits_kernel(x_ref, w_ref, lse_ref, dlse_ref, dz_ref, lse_s, dlse_s, dz_s, bar, *, cfg, v,
                    nd):
  bn, bv = cfg.block_n, cfg.block_v
  i, j = lax.axis_index("n"), lax.axis_index("v")
  rows = pl.ds(i * bn, bn)
  plgpu.copy_gmem_to_smem(lse_ref.at[rows], lse_s, bar)
  plgpu.copy_gmem_to_smem(dlse_ref.at[rows], dlse_s, bar)
  plgpu.barrier_wait(bar)
  row = plgpu.Layout.WGMMA.reduce(1)
  lse, dlse = plgpu.load(lse_s, layout=row), plgpu.load(dlse_s, layout=row)
  z = _masked(_logits(x_ref, w_ref, i, j, cfg=cfg, nd=nd), j, bv=bv, v=v)
  dz = jnp.exp(z - _rows(lse, z.shape)) * _rows(dlse, z.shape)
  dz_s[...] = dz.astype(dz_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dz_s, dz_ref.at[rows, pl.ds(j * bv, bv)])
  plgpu.wait_smem_to_gmem(0)


def _matmul_kernel(a_ref, b_ref, o_ref, acc, *, nk, stages, trans_a, trans_b):
  """``o[i, j] = sum_k op(a)[i, k] @ op(b)[k, j]`` with ``op`` an optional transpose of the
  stored operand (``a`` stored ``[K, M]`` when ``trans_a``; ``b`` stored ``[N, K]`` when
  ``trans_b``); the transpose is a view of the SMEM tile that wgmma reads."""
  i, j = lax.axis_index("m"), lax.axis_index("n")
  tr = _mma_transforms()
  a_spec = plgpu.BlockSpec((MM_K, MM_M) if trans_a else (MM_M, MM_K),
                           (lambda k: (k, i)) if trans_a else (lambda k: (i, k)), transforms=tr)
  b_spec = plgpu.BlockSpec((MM_N, MM_K) if trans_b else (MM_K, MM_N),
                           (lambda k: (j, k)) if trans_b else (lambda k: (k, j)), transforms=tr)

  def step(_, a_s, b_s):
    plgpu.wgmma(acc, a_s.transpose((1, 0)) if trans_a else a_s,
                b_s.transpose((1, 0)) if trans_b else b_s)
    plgpu.wgmma_wait(0)

  mgc.pipeline(step, grid=(nk,), in_specs=[a_spec, b_spec], stages=stages)(a_ref, b_ref)

  def store(o_s):  # a separate scope: the interpreter cannot mix ACC and SMEM in one
    o_s[...] = acc[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_ref.at[pl.ds(i * MM_M, MM_M), pl.ds(j * MM_N, MM_N)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((MM_M, MM_N), _F32))


def _matmul(a, b, *, trans_a, trans_b, stages, interpret):
  """float32 ``op(a) @ op(b)`` of 16-bit operands (dims multiples of the MM tiles)."""
  m, k = a.shape[::-1] if trans_a else a.shape
  n = b.shape[0] if trans_b else b.shape[1]
  return plgpu.kernel(
      functools.partial(_matmul_kernel, nk=k // MM_K, stages=stages, trans_a=trans_a,
                        trans_b=trans_b),
      out_type=jax.ShapeDtypeStruct((m, n), _F32), grid=(m // MM_M, n // MM_N),
      grid_names=("m", "n"),
      scratch_types=[plgpu.ACC((MM_M, MM_N), _F32)],
      **mgc.kernel_kwargs(interpret))(a, b)


def forward(x, w, *, v: int, config: Config, interpret: bool = False):
  """Per-token ``lse`` (float32 ``[N_p]``) of padded ``x`` [N_p, D_p] @ ``w`` [D_p, V_p]."""
  n_p, d_p = x.shape
  bn, bv = config.block_n, config.block_v
  splits = config.v_splits
  per_split = w.shape[1] // bv // splits
  part = jax.ShapeDtypeStruct((splits, n_p), _F32)
  m, s = plgpu.kernel(
      functools.partial(_fwd_kernel, cfg=config, v=v, nd=d_p // config.block_d,
                        per_split=per_split),
      out_type=(part, part), grid=(n_p // bn, splits), grid_names=("n", "s"),
      scratch_types=[plgpu.SMEM((bn,), _F32), plgpu.SMEM((bn,), _F32)],
      **mgc.kernel_kwargs(interpret))(x, w)
  mx = jnp.max(m, axis=0)
  mx = jnp.where(mx == -jnp.inf, 0.0, mx)
  return mx + jnp.log(jnp.sum(s * jnp.exp(m - mx[None, :]), axis=0))


def dlogits(x, w, lse, dlse, *, v: int, config: Config, interpret: bool = False):
  """``exp(x @ w - lse) * dlse`` ([N, V_p] in x.dtype; 0 in padded vocabulary columns)."""
  n, d_p = x.shape
  bn, bv = config.block_n, config.block_v
  return plgpu.kernel(
      functools.partial(_dlogits_kernel, cfg=config, v=v, nd=d_p // config.block_d),
      out_type=jax.ShapeDtypeStruct((n, w.shape[1]), x.dtype),
      grid=(n // bn, w.shape[1] // bv), grid_names=("n", "v"),
      scratch_types=[plgpu.SMEM((bn,), _F32), plgpu.SMEM((bn,), _F32),
                     plgpu.SMEM((bn, bv), x.dtype), plgpu.Barrier(num_arrivals=2)],
      **mgc.kernel_kwargs(interpret))(x, w, lse, dlse)


def backward(x, w, lse, dlse, *, v: int, config: Config, interpret: bool = False):
  """``(dx, dweight)`` in float32 of ``lse`` with cotangent ``dlse`` (all padded arrays).

  Tokens are processed in ``cdiv(N_p, chunk_tokens)`` equal chunks (a ``lax.scan``), so the
  dlogits buffer is at most ``[chunk_tokens, V_p]`` whatever N is.
  """
  n_p, d_p = x.shape
  n_chunks = autotune.cdiv(n_p, config.chunk_tokens)
  chunk = n_p // n_chunks  # whole blocks: _pad_sizes made N_p = n_chunks * chunk
  assert chunk * n_chunks == n_p and chunk % MM_M == 0, (n_p, config.chunk_tokens)

  def one(dw, args):
    xc, lc, gc = args
    dz = dlogits(xc, w, lc, gc, v=v, config=config, interpret=interpret)
    dxc = _matmul(dz, w, trans_a=False, trans_b=True, stages=config.stages,
                  interpret=interpret)
    return dw + _matmul(xc, dz, trans_a=True, trans_b=False, stages=config.stages,
                        interpret=interpret), dxc

  if n_chunks == 1:
    dw, dx = one(jnp.zeros(w.shape, _F32), (x, lse, dlse))
    return dx, dw
  dw, dx = lax.scan(one, jnp.zeros(w.shape, _F32),
                    (x.reshape(n_chunks, chunk, d_p), lse.reshape(n_chunks, chunk),
                     dlse.reshape(n_chunks, chunk)))
  return dx.reshape(n_p, d_p), dw


# ---------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _lse(x, w, v, fwd_cfg, bwd_cfg, interpret):
  return forward(x, w, v=v, config=fwd_cfg, interpret=interpret)


def _lse_fwd(x, w, v, fwd_cfg, bwd_cfg, interpret):
  lse = forward(x, w, v=v, config=fwd_cfg, interpret=interpret)
  return lse, (x, w, lse)


def _lse_bwd(v, fwd_cfg, bwd_cfg, interpret, res, g):
  x, w, lse = res
  dx, dw = backward(x, w, lse, g.astype(_F32), v=v, config=bwd_cfg, interpret=interpret)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_lse.defvjp(_lse_fwd, _lse_bwd)


def _pad_sizes(n, d, v, fwd_cfg, bwd_cfg):
  """Padded ``(N_p, D_p, V_p)``: whole blocks of every kernel (both configs, the matmul tiles,
  the forward's vocabulary splits, the backward's chunks)."""
  bn = math.lcm(fwd_cfg.block_n, bwd_cfg.block_n, MM_M, MM_K)
  n_chunks = autotune.cdiv(mgc.round_up(n, bn), bwd_cfg.chunk_tokens)
  # Equal chunks of whole blocks (<= chunk_tokens, a multiple of 128 >= bn): little padding.
  n_p = n_chunks * mgc.round_up(autotune.cdiv(mgc.round_up(n, bn), n_chunks), bn)
  d_p = mgc.round_up(d, math.lcm(fwd_cfg.block_d, bwd_cfg.block_d, MM_N, MM_K))
  v_p = mgc.round_up(v, math.lcm(fwd_cfg.block_v * fwd_cfg.v_splits, bwd_cfg.block_v, MM_N, MM_K))
  return n_p, d_p, v_p


def per_token_loss(x, weight, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   interpret=False, config=None):
  """``[N]`` float32 losses (0 for ignored tokens) with Mosaic GPU kernels.

  ``config``: a :class:`Config`, a dict of its fields, or ``{"fwd": ..., "bwd": ...}``.
  """
  mgc.check_available("linear_cross_entropy", bool(interpret))
  n, d = x.shape
  v = weight.shape[1]
  problem = unsupported(n, d, v, x.dtype)
  if problem:
    raise ValueError(f"linear_cross_entropy mosaic_gpu: {problem}")
  fwd_c, bwd_c = (config.get("fwd"), config.get("bwd")) if (
      isinstance(config, dict) and "fwd" in config) else (config, config)
  fwd_cfg = resolve_config("fwd", (n, d, v), x.dtype, fwd_c)
  bwd_cfg = resolve_config("bwd", (n, d, v), x.dtype, bwd_c)
  n_p, d_p, v_p = _pad_sizes(n, d, v, fwd_cfg, bwd_cfg)
  lse = _lse(mgc.pad2(x, n_p, d_p), mgc.pad2(weight, d_p, v_p), v, fwd_cfg, bwd_cfg,
             bool(interpret))[:n]
  # The [N, D]-sized terms, with XLA's autodiff: the label logit and the logit sum.
  valid = labels != ignore_index
  safe = jnp.where(valid & (labels >= 0) & (labels < v), labels, 0)
  label_logit = jnp.einsum("nd,dn->n", x, jnp.take(weight, safe, axis=1),
                           preferred_element_type=_F32)
  sum_logits = None
  if label_smoothing:
    sum_logits = jnp.dot(x.astype(_F32), jnp.sum(weight.astype(_F32), axis=1))
  return loss_from_stats(lse, label_logit, sum_logits, valid, vocab=v,
                         label_smoothing=label_smoothing, z_loss=z_loss)

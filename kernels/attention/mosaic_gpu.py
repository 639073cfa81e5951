"""``implementation="mosaic_gpu"``: flash attention as Pallas Mosaic GPU (``plgpu``) kernels.

Hopper (sm_90) design, one warpgroup (128 threads) per CTA, every matmul a ``wgmma`` with a
64-row warpgroup tile whose operands both sit in shared memory:
  * forward, grid ``(T / block_q, heads, batch)``: TMA brings the query block into SMEM once and
    the visible key/value blocks through a ring of ``num_stages`` SMEM slots (the copy of block
    ``j + num_stages - 1`` is in flight while block ``j`` is computed). ``s = q k^T`` goes into a
    fresh ``plgpu.ACC``; the online softmax runs in float32 registers in the WGMMA layout; ``p``
    is rounded to the input dtype and stored to SMEM, ``p v`` goes into another fresh ACC and
    is added to the rescaled output carried in registers. Writes the output and ``lse``
    ``[B, N, T]`` by TMA (staged through the query tile).
  * backward (``mosaic_gpu_bwd.py``): a dq kernel over query blocks and a dk/dv kernel over key
    blocks that walks the query heads of its kv head (GQA) and their visible query blocks.
Causal and sliding-window blocks that are fully hidden are never visited (the loop bounds
come from ``common.kv_block_range`` / ``common.q_block_range``); the rest are masked by
position, segment ids and ``j < kv_len``.

Why SMEM x SMEM wgmma everywhere (also for ``p v``, where FA3 keeps ``p`` in registers): it is
the form that both runs in Pallas's GPU interpreter (the CPU numerics tests) and lowers for a
real GPU; register-LHS wgmma and ``run_state(ACC.init)`` do not run in the interpreter
(``shared/FACTS-mosaic-gpu.md``). Row reductions work on values with explicit WGMMA layouts.

Writing an accumulator (``acc[...] = x``, to rescale it in place) does not run in the
interpreter either, hence the float32 output (and dq, dk, dv) carried in registers.

Ragged T and S are zero-padded to whole blocks outside the ``custom_vjp`` (JAX differentiates the
padding); padded keys are hidden by position. Needs JAX >= 0.11, bf16/f16 and head_dim 64, 128
or 256; a bias or an explicit mask falls back to another implementation.

Not yet measured on a GPU (CPU checks only): no warp specialization or ping-pong between two
warpgroups as in FA3, so expect less than FA3 throughput; at head_dim 256 the output carry and
the ``p v`` accumulator take 2 x 128 float32 registers per thread (dk/dv likewise), which ptxas
may spill.
"""
from __future__ import annotations

import dataclasses

import jax

from . import common
from . import mosaic_gpu_bwd as bwd
from . import mosaic_gpu_fwd as fwd
from .. import autotune
from .. import mosaic_gpu_common as mgc

SUPPORTED_DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128, 256)
ROWS = 64  # wgmma's warpgroup tile: every block is a multiple of 64 rows
_STAGES = (2, 3)
AUTOTUNE_OP = "attention_mosaic_gpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (multiples of 64) and the depth of the TMA ring; tune per GPU and shape.

  ``block_q`` rows of queries per forward CTA (one warpgroup; 128 = two m64 wgmmas), ``block_k``
  keys per step; ``num_stages``: key/value (forward, dq) or query/dout (dk/dv) blocks in flight.
  """
  block_q: int = 64
  block_k: int = 128
  num_stages: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64

  @classmethod
  def default(cls, q_len: int, kv_len: int, head_dim: int, dtype) -> BlockSizes:
    """64-row query tiles; 128-key steps up to head_dim 128, 64 at 256 (SMEM and registers)."""
    del q_len, kv_len, dtype
    return cls(block_k=128 if head_dim <= 128 else 64)

  def fit(self, q_len: int, kv_len: int) -> BlockSizes:
    """Short sequences: one 64-row block instead of mostly padding."""
    tq, tk = common.round_up(q_len, ROWS), common.round_up(kv_len, ROWS)
    return dataclasses.replace(
        self, block_q=min(self.block_q, tq), block_k=min(self.block_k, tk),
        block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, tk),
        block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, tk))

  def validate(self):
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
      x = getattr(self, f)
      if x not in (64, 128):
        raise ValueError(f"mosaic_gpu attention: BlockSizes.{f}={x} must be 64 or 128")
    if self.num_stages < 1:
      raise ValueError(f"mosaic_gpu attention: num_stages={self.num_stages} must be >= 1")


def smem_bytes(bs: BlockSizes, head_dim: int, itemsize: int = 2) -> dict:
  """Estimated shared memory per kernel: the tiles (the exported kernels measure 2-4 KiB more:
  barriers and the alignment of swizzled tiles)."""
  d, n = head_dim, bs.num_stages
  fwd = itemsize * (bs.block_q * d + 2 * n * bs.block_k * d + bs.block_q * bs.block_k)
  fwd += 4 * (bs.block_q + n * bs.block_k)
  dq = itemsize * (2 * bs.block_q_dq * d + 2 * n * bs.block_k_dq * d
                   + bs.block_q_dq * bs.block_k_dq) + 4 * (3 * bs.block_q_dq + n * bs.block_k_dq)
  dkv = itemsize * (2 * bs.block_k_dkv * d + 2 * n * bs.block_q_dkv * d
                    + 2 * bs.block_q_dkv * bs.block_k_dkv)
  dkv += 4 * (bs.block_k_dkv + 3 * n * bs.block_q_dkv)
  return {"fwd": fwd, "dq": dq, "dkv": dkv}


def fits(bs: BlockSizes, head_dim: int) -> bool:
  # 8 KiB of headroom: the exported kernels measure up to 4 KiB above the estimate (barriers,
  # 1 KiB alignment of swizzled tiles).
  return max(smem_bytes(bs, head_dim).values()) <= mgc.MAX_SMEM_BYTES - 8192


def autotune_candidates(q_len: int, kv_len: int, head_dim: int, dtype) -> list[BlockSizes]:
  """Every block configuration worth timing at this shape (block sizes x pipeline depth)."""
  del dtype
  out = []
  for bq in (64, 128):
    for bk in (64, 128):
      for stages in _STAGES:
        for bdq in (64, 128):
          bs = BlockSizes(block_q=bq, block_k=bk, num_stages=stages, block_q_dq=64,
                          block_k_dq=bdq, block_q_dkv=64, block_k_dkv=bdq).fit(q_len, kv_len)
          if fits(bs, head_dim) and bs not in out:
            out.append(bs)
  return out


# The configurations the lowering tests export for cuda (tests/kernels/test_attention_mosaic_gpu).
SHIPPED_CONFIGS = tuple(
    (d, dt, BlockSizes.default(4096, 4096, d, dt))
    for d in HEAD_DIMS for dt in SUPPORTED_DTYPES)


def _valid(cfg) -> bool:
  try:
    BlockSizes(**cfg).validate()
  except (TypeError, ValueError):
    return False
  return True


def get_block_sizes(q_len: int, kv_len: int, head_dim: int, dtype) -> BlockSizes:
  """Tuned tiles for this device kind from the autotune cache, else ``BlockSizes.default``.

  Cache entry: op ``"attention_mosaic_gpu.fwd"`` (it holds the backward tiles too), dims
  ``(q_len, kv_len, head_dim)``, config ``dataclasses.asdict(BlockSizes(...))``; an entry that
  does not fit in shared memory is ignored.
  """
  default = BlockSizes.default(q_len, kv_len, head_dim, dtype)
  cfg = autotune.get_config(f"{AUTOTUNE_OP}.fwd", (q_len, kv_len, head_dim), dtype,
                            lambda: dataclasses.asdict(default), validate=_valid)
  bs = BlockSizes(**cfg)
  return bs if fits(bs, head_dim) else default


_flash = common.flash_with_vjp(fwd.forward, bwd.backward)


def attention(query, key, value, bias=None, mask=None, query_segment_ids=None,
              kv_segment_ids=None, *, scale: float, window: common.Window,
              soft_cap: float | None = None, interpret: bool = False,
              block_sizes: BlockSizes | None = None):
  """query ``[B, T, N, D]``, key/value ``[B, S, K, D]`` -> ``[B, T, N, D]`` (query dtype).

  Segment ids ``[B, T]`` / ``[B, S]`` int32. ``bias`` and ``mask`` are not supported (the
  dispatcher falls back). ``block_sizes``: tiles for tuning (default: the autotune cache for
  this device kind, else ``BlockSizes.default``).
  """
  _, t, n, d = query.shape
  s_len, kh = key.shape[1], key.shape[2]
  mgc.check_available("dot_product_attention", bool(interpret))
  args_reason = _shape_reason(str(query.dtype), d, bias is not None, mask is not None)
  if args_reason is not None:
    raise ValueError(f"implementation='mosaic_gpu': {args_reason}")
  bs = block_sizes or get_block_sizes(t, s_len, d, query.dtype)
  bs = bs.fit(t, s_len)
  bs.validate()
  tp = common.round_up(t, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  sp = common.round_up(s_len, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  q = common.pad_axis(query, 1, tp)
  k = common.pad_axis(key, 1, sp)
  v = common.pad_axis(value, 1, sp)
  qseg = common.pad_axis(query_segment_ids, 1, tp)
  kseg = common.pad_axis(kv_segment_ids, 1, sp)
  c = fwd.Static(scale=float(scale), window=window, soft_cap=soft_cap, kv_len=s_len,
                 kv_padded=sp != s_len, groups=n // kh, blocks=bs, interpret=bool(interpret))
  out = _flash(c, q, k, v, qseg, kseg)
  return out[:, :t]


def _shape_reason(dtype: str, head_dim: int, has_bias: bool, has_mask: bool) -> str | None:
  if dtype not in SUPPORTED_DTYPES:
    return f"dtype {dtype} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} is not supported (supported: {', '.join(map(str, HEAD_DIMS))})"
  if has_bias or has_mask:
    return ("a bias or an explicit mask is not supported (causal, sliding window, segment ids "
            "and soft cap are)")
  return None


def unavailable_reason() -> str | None:
  """Why this kernel cannot run in this process whatever the arguments, or None: JAX < 0.11, or
  a local GPU that is not a Hopper (wgmma is sm_90 only). The default selection skips the
  backend silently then; naming it explicitly raises."""
  reason = mgc.version_error()
  if reason is None and jax.default_backend() == "gpu":
    device = jax.devices()[0]
    cc = str(getattr(device, "compute_capability", "9.0"))
    if cc.split(".")[0] != "9":
      reason = (f"implementation='mosaic_gpu' needs a Hopper GPU (sm_90); this is "
                f"{device.device_kind} (compute capability {cc})")
  return reason


def unsupported_reason(args) -> str | None:
  """Why this kernel cannot serve ``args`` (an ``AttentionArgs``), or None.

  The platform check assumes no interpret mode: ``attention(..., interpret=True)`` runs
  anywhere JAX >= 0.11 does (the dispatcher checks that case with ``interpret_reason``).
  """
  return (unavailable_reason() or mgc.unsupported_platform_reason(args.platform, False)
          or _shape_reason(args.dtype, args.head_dim, args.has_bias, args.has_mask))


def interpret_reason(args) -> str | None:
  """``unsupported_reason`` under ``interpret=True`` (the GPU interpreter runs on any host)."""
  return mgc.version_error() or _shape_reason(args.dtype, args.head_dim, args.has_bias,
                                              args.has_mask)

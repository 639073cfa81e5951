"""implementation="mosaic_gpu" (Pallas Mosaic GPU flash attention) checked on a CPU-only machine.

Two gates, both needed (shared/FACTS-mosaic-gpu.md: the GPU interpreter and the real lowering
accept different subsets of plgpu):
  * gate 1, numerics: the kernels run in Pallas's GPU interpreter (simulated SMEM, TMA,
    barriers, wgmma; race detection on) at small ragged shapes, forward and gradients against
    the float64 reference, with test_attention.py's error measure and tolerances;
  * gate 2, lowering: every shipped block configuration is exported for cuda (the real Mosaic
    GPU lowering: layout inference, SMEM budget, tiling) and the embedded kernels are read
    back: sm_90, 128 threads (one warpgroup), m64 wgmma tiles, TMA copies, SMEM under the cap.
Mosaic GPU kernels need JAX >= 0.11; on older JAX the complementary test checks the one-line
error instead (the skipif marks route tests by version, they skip no work).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels import attention, autotune, mosaic_gpu_common as mgc
from llmx_kernels.attention import common, mosaic_gpu as attn_mgpu
from tests.kernels.test_attention import (TOLERANCE, Case, _seed, fast_jit, make_inputs,
                                          reference_result, rel_err, visible_mask)

NEW_JAX = mgc.jax_version() >= mgc.MIN_JAX
new_jax = pytest.mark.skipif(not NEW_JAX, reason="JAX < 0.11: test_old_jax_* covers it")
old_jax = pytest.mark.skipif(NEW_JAX, reason="JAX >= 0.11: the kernel tests cover it")

BLOCKS_64 = attn_mgpu.BlockSizes(block_q=64, block_k=64, num_stages=2)

# Gate 1 cases: every feature at least once, not the product (each case is a few seconds of
# interpretation). T and S are not multiples of 64, so the last blocks are padded and masked.
NUMERICS = {
    "bf16_d64_causal_gqa": (Case(t=100, b=1, n=4, k=2, d=64, dtype="bfloat16", causal=True),
                            BLOCKS_64),
    "f16_d128_T130_S70_causal_soft_cap": (
        Case(t=130, s=70, b=1, n=2, d=128, dtype="float16", causal=True, soft_cap=5.0),
        BLOCKS_64),
    "bf16_d64_T70_S130_segments_window": (
        Case(t=70, s=130, b=1, n=2, d=64, dtype="bfloat16", segments="packed", window=(20, 10)),
        BLOCKS_64),
    "f16_d64_padded_segments_empty_rows_mqa": (
        Case(t=57, s=80, b=1, n=4, k=1, d=64, dtype="float16", segments="padded",
             expect_empty_rows=True), BLOCKS_64),
    # 4 key blocks through a 3-deep TMA ring (the ring wraps); 128-row query and key tiles.
    "bf16_d64_S250_ring3_blocks128": (
        Case(t=130, s=250, b=1, n=2, k=1, d=64, dtype="bfloat16", causal=True, window=(150, 0)),
        attn_mgpu.BlockSizes(block_q=128, block_k=64, num_stages=3, block_q_dq=64,
                             block_k_dq=128, block_q_dkv=64, block_k_dkv=128)),
    "bf16_d256_causal": (Case(t=70, b=1, n=1, d=256, dtype="bfloat16", causal=True), BLOCKS_64),
}


def run_mgpu(case: Case, inputs, blocks):
  """(out, dq, dk, dv) of the Mosaic GPU kernels in the GPU interpreter."""
  q, k, v, do, _, _, qseg, kseg = inputs
  scale = case.d ** -0.5 if case.scale is None else case.scale

  def fn(q, k, v):
    return attn_mgpu.attention(
        q, k, v, None, None, qseg, kseg, scale=scale,
        window=common.make_window(case.causal, case.window), soft_cap=case.soft_cap,
        interpret=True, block_sizes=blocks)

  @fast_jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(do)

  return fwd_bwd(q, k, v, do)


def check_numerics(case: Case, blocks, seed: int) -> dict:
  inputs = make_inputs(case, seed)
  got = run_mgpu(case, inputs, blocks)
  want = reference_result(case, inputs)
  errors = {}
  for name, x, r, like in zip(("out", "dq", "dk", "dv"), got, want, inputs[:4]):
    assert x.shape == r.shape and x.dtype == like.dtype, (name, x.shape, x.dtype)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name} has NaN/inf"
    errors[name] = rel_err(x, r)
  tol = TOLERANCE[case.dtype]
  assert max(errors.values()) <= tol, f"errors {errors} > {tol:.0e} for {case}"
  # Query rows that see no key: exactly zero output and dq, never NaN.
  _, _, _, _, _, mask, qseg, kseg = inputs
  seen = visible_mask(case.b, case.n, case.t, case.kv_len, causal=case.causal,
                      window=case.window, mask=mask, q_seg=qseg, kv_seg=kseg)
  empty = ~seen.any(-1).transpose(0, 2, 1)  # [B, T, N]
  assert empty.any() or not case.expect_empty_rows
  assert np.all(np.asarray(got[0], np.float32)[empty] == 0.0)
  assert np.all(np.asarray(got[1], np.float32)[empty] == 0.0)
  return errors


@new_jax
@pytest.mark.parametrize("name", list(NUMERICS))
def test_interpret_numerics(name):
  case, blocks = NUMERICS[name]
  errors = check_numerics(case, blocks, _seed(name))
  print(name, {k: f"{e:.1e}" for k, e in errors.items()})  # shown by pytest -rA


@new_jax
def test_public_op_interpret_default_blocks():
  """Through dot_product_attention, with the default (autotune/heuristic) tiles."""
  case = Case(t=40, s=90, b=1, n=2, k=1, d=64, dtype="bfloat16", causal=True)
  q, k, v, do, *_ = make_inputs(case, 7)
  fn = lambda q, k, v: kernels.dot_product_attention(
      q, k, v, is_causal=True, implementation="mosaic_gpu", interpret=True)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  want = reference_result(case, (q, k, v, do, None, None, None, None))
  for x, r in zip((out,) + vjp(do), want):
    assert rel_err(x, r) <= TOLERANCE["bfloat16"]


# --- Gate 2: lowering for cuda ------------------------------------------------------------------

def _export(d, dtype, blocks, *, grad: bool, causal=True, segments=True):
  """Exported kernels of the forward (1 kernel) or of jax.grad (fwd, dq, dk/dv), with GQA."""
  sds = jax.ShapeDtypeStruct
  t = 320  # ragged against 128-key tiles
  q, kv, seg = sds((2, t, 4, d), dtype), sds((2, t, 2, d), dtype), sds((2, t), jnp.int32)

  def fwd(q, k, v, seg):
    return attn_mgpu.attention(
        q, k, v, None, None, seg if segments else None, seg if segments else None,
        scale=d ** -0.5, window=common.make_window(causal, (200, 0)), soft_cap=20.0,
        block_sizes=blocks)

  def loss_grad(q, k, v, seg):
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with kernels.target_platform("gpu"):
    return mgc.exported_kernels(mgc.export_for_cuda(loss_grad if grad else fwd, q, kv, kv, seg))


def _check_kernel(kernel, dtype, *, want_shapes, smem_estimate):
  assert kernel.arch_major == 9
  assert kernel.threads == 128  # one warpgroup
  assert kernel.tma_copies > 0
  assert kernel.wgmma_shapes and all(s.startswith("m64n") for s in kernel.wgmma_shapes)
  assert set(want_shapes) <= kernel.wgmma_shapes, (want_shapes, kernel.wgmma_shapes)
  t = {"bfloat16": "bf16", "float16": "f16"}[jnp.dtype(dtype).name]
  assert kernel.wgmma_types == {f"f32.{t}.{t}"}
  assert kernel.smem_bytes <= mgc.MAX_SMEM_BYTES
  # The estimate behind fits() / autotune_candidates() is within its 8 KiB headroom.
  assert smem_estimate <= kernel.smem_bytes <= smem_estimate + 8192, (
      smem_estimate, kernel.smem_bytes)


def _check_exports(d, dtype, blocks):
  blocks = blocks.fit(320, 320)
  est = attn_mgpu.smem_bytes(blocks, d)
  (fwd,) = _export(d, dtype, blocks, grad=False)
  _check_kernel(fwd, dtype, want_shapes={f"m64n{blocks.block_k}k16", f"m64n{d}k16"},
                smem_estimate=est["fwd"])
  fwd2, dq, dkv = _export(d, dtype, blocks, grad=True)
  assert fwd2.smem_bytes == fwd.smem_bytes
  _check_kernel(dq, dtype, want_shapes={f"m64n{blocks.block_k_dq}k16", f"m64n{d}k16"},
                smem_estimate=est["dq"])
  _check_kernel(dkv, dtype, want_shapes={f"m64n{blocks.block_q_dkv}k16", f"m64n{d}k16"},
                smem_estimate=est["dkv"])
  return fwd, dq, dkv


@new_jax
@pytest.mark.parametrize("d,dtype,blocks", attn_mgpu.SHIPPED_CONFIGS,
                         ids=[f"d{d}_{t}" for d, t, _ in attn_mgpu.SHIPPED_CONFIGS])
def test_shipped_configs_lower_for_cuda(d, dtype, blocks):
  _check_exports(d, dtype, blocks)


@new_jax
def test_head_dim_128_bf16_uses_64_row_wgmma_and_tma():
  """The issue's acceptance check, forward and backward, at head dim 128 in bf16."""
  blocks = attn_mgpu.BlockSizes.default(4096, 4096, 128, jnp.bfloat16)
  assert (128, "bfloat16", blocks) in attn_mgpu.SHIPPED_CONFIGS
  fwd, dq, dkv = _check_exports(128, jnp.bfloat16, blocks)
  for kernel in (fwd, dq, dkv):
    assert "m64n128k16" in kernel.wgmma_shapes


@new_jax
def test_largest_autotune_candidate_fits_shared_memory():
  """fits() is conservative: the candidate with the most SMEM at head dim 256 still lowers."""
  cands = attn_mgpu.autotune_candidates(4096, 4096, 256, jnp.bfloat16)
  assert attn_mgpu.BlockSizes.default(4096, 4096, 256, jnp.bfloat16) in cands
  biggest = max(cands, key=lambda b: max(attn_mgpu.smem_bytes(b, 256).values()))
  kernels_ = _export(256, jnp.bfloat16, biggest, grad=True, causal=False, segments=False)
  assert all(k.smem_bytes <= mgc.MAX_SMEM_BYTES for k in kernels_)


def test_autotune_candidates_and_shipped_configs():
  for d in attn_mgpu.HEAD_DIMS:
    cands = attn_mgpu.autotune_candidates(2048, 2048, d, jnp.float16)
    assert len(cands) == len(set(cands)) >= 2
    assert {c.num_stages for c in cands} >= {2, 3} or d == 256
    assert all(attn_mgpu.fits(c, d) for c in cands)
  shipped = {(d, t) for d, t, _ in attn_mgpu.SHIPPED_CONFIGS}
  assert shipped == {(d, t) for d in (64, 128, 256) for t in ("bfloat16", "float16")}
  # Short sequences get one 64-row block, not mostly padding.
  assert attn_mgpu.autotune_candidates(40, 40, 64, jnp.bfloat16) == [
      attn_mgpu.BlockSizes(block_q=64, block_k=64, num_stages=s, block_k_dq=64,
                           block_k_dkv=64) for s in (2, 3)]


def test_block_sizes_from_autotune_cache(tmp_path, monkeypatch):
  path = tmp_path / "autotune.json"
  monkeypatch.setenv(autotune.CACHE_ENV, str(path))
  default = attn_mgpu.get_block_sizes(1000, 1000, 128, jnp.bfloat16)
  assert default == attn_mgpu.BlockSizes.default(1000, 1000, 128, jnp.bfloat16)
  tuned = attn_mgpu.BlockSizes(block_q=128, block_k=64, num_stages=3)
  autotune.record(f"{attn_mgpu.AUTOTUNE_OP}.fwd", (1000, 1000, 128), jnp.bfloat16,
                  dataclasses.asdict(tuned), path=path)
  assert attn_mgpu.get_block_sizes(1000, 1000, 128, jnp.bfloat16) == tuned
  # An entry that does not fit in shared memory falls back to the heuristic.
  autotune.record(f"{attn_mgpu.AUTOTUNE_OP}.fwd", (1000, 1000, 256), jnp.bfloat16,
                  dataclasses.asdict(attn_mgpu.BlockSizes(block_k=128, num_stages=3)),
                  path=path)
  assert attn_mgpu.get_block_sizes(1000, 1000, 256, jnp.bfloat16) == (
      attn_mgpu.BlockSizes.default(1000, 1000, 256, jnp.bfloat16))


# --- Selection and bad input ------------------------------------------------------------------

def _args(**kw):
  base = dict(batch=1, q_len=128, kv_len=128, num_heads=4, num_kv_heads=4, head_dim=128,
              dtype="bfloat16", has_bias=False, has_mask=False, has_segment_ids=True,
              window=common.Window(None, 0), soft_cap=None, platform="gpu")
  base.update(kw)
  return attention.AttentionArgs(**base)


def test_default_selection(recwarn):
  assert attention.DEFAULT_ORDER["gpu"][:2] == ("mosaic_gpu", "triton")
  # Older JAX: skipped without a warning (it is not a fallback from these arguments).
  assert attention._select(None, _args(), False) == ("mosaic_gpu" if NEW_JAX else "triton")
  assert not [w for w in recwarn if "cannot serve" in str(w.message)]
  # interpret=True keeps triton as the default kernel.
  assert attention._select(None, _args(platform="cpu"), True) == "triton"
  if NEW_JAX:
    attention._warned.clear()
    with pytest.warns(UserWarning, match="'mosaic_gpu' cannot serve.*bias.*falling back to "
                                         "'triton'"):
      assert attention._select(None, _args(has_bias=True), False) == "triton"


def _qkv(d=64, dtype=jnp.bfloat16, t=70):
  x = jnp.ones((1, t, 2, d), dtype)
  return x, x, x


def _one_line_error(match, **kw):
  q, k, v = kw.pop("qkv", None) or _qkv()
  with pytest.raises(ValueError, match=match) as err:
    kernels.dot_product_attention(q, k, v, implementation="mosaic_gpu", **kw)
  assert "\n" not in str(err.value)


@old_jax
def test_old_jax_one_line_error():
  _one_line_error(r"mosaic_gpu.*needs JAX >= 0\.11.*this is JAX 0\.10", interpret=True)
  _one_line_error(r"needs JAX >= 0\.11")


@new_jax
def test_errors_bad_input():
  _one_line_error(r"mosaic_gpu.*runs on NVIDIA GPUs.*not on 'cpu'.*interpret=True")
  _one_line_error(r"dtype float32 is not supported \(supported: bfloat16, float16\)",
                  qkv=_qkv(dtype=jnp.float32), interpret=True)
  _one_line_error(r"head_dim 96 is not supported \(supported: 64, 128, 256\)",
                  qkv=_qkv(d=96), interpret=True)
  _one_line_error(r"bias or an explicit mask is not supported", interpret=True,
                  bias=jnp.zeros((1, 1, 70, 70)))
  # The module entry point checks as well (it is not only reached through the dispatcher).
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"not on 'cpu'"):
    attn_mgpu.attention(q, k, v, scale=0.1, window=common.Window())
  with pytest.raises(ValueError, match=r"BlockSizes.block_k=96 must be 64 or 128"):
    attn_mgpu.attention(q, k, v, scale=0.1, window=common.Window(), interpret=True,
                        block_sizes=attn_mgpu.BlockSizes(block_k=96))

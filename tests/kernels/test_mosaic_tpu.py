"""The "mosaic_tpu" kernels (Pallas TPU) on a CPU-only machine.

* Numerics: every kernel runs in Pallas's TPU interpreter (``interpret=True`` ->
  ``pltpu.InterpretParams()``, which models VMEM, the grid and scratch buffers) and is compared
  with float64 references, forward and gradients, at odd sizes that need padding to TPU tiles
  (8 x 128) and with several blocks per axis. The TPU interpreter is 10-40x slower than the
  plain one, so the shapes are tiny and features share cases.
* Lowering: ``jax.export(..., platforms=["tpu"])`` of forward + backward holds Mosaic
  ``tpu_custom_call``s (this checks block shapes against TPU tiling; it does not run the real
  Mosaic compiler, which needs a TPU).
* Dispatch: ``implementation=None`` picks "mosaic_tpu" for TPU (``kernels.target_platform``),
  falls back with one warning where the kernel cannot serve the arguments (dense bias), and
  the GPT train step exported for TPU holds the Mosaic kernels of every fused op it uses.
"""
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels import attention
from llmx_kernels.attention import common
from llmx_kernels.attention import mosaic_tpu as attn_tpu
from llmx_kernels.cross_entropy import mosaic_tpu as ce_tpu
from llmx_kernels.norms import mosaic_tpu as norms_tpu
from llmx_kernels.softmax import mosaic_tpu as softmax_tpu
from tests.kernels import test_attention as ta
from tests.kernels import test_cross_entropy as tce
from tests.kernels import test_norms as tn
from tests.kernels import test_softmax as tsm


def _tpu_calls(fn, *args):
  """Number of Mosaic custom calls in ``fn`` exported for TPU (traced fresh, here)."""
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  return exported.mlir_module().count("tpu_custom_call")


# --- softmax ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis,dtype,masked,block_rows", [
    ((3, 5, 77), -1, jnp.float32, True, 8),      # 15 rows -> 2 blocks of 8; 77 -> 128 lanes
    ((6, 3, 50), (0, 2), jnp.bfloat16, False, None),  # two softmax axes, 300 columns
])
def test_softmax_interpret_matches_float64(shape, axis, dtype, masked, block_rows):
  rng = tsm._rng("mosaic", shape, masked)
  x = jnp.asarray(rng.standard_normal(shape) * 3.0, dtype)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  mask = None
  if masked:
    mask = rng.random(shape) < 0.7
    mask[0, 0] = False  # a row with nothing allowed
  scale = 0.7
  fn = lambda a: softmax_tpu.softmax(
      a, None if mask is None else jnp.asarray(mask), axis=axis if isinstance(axis, tuple)
      else (axis,), scale=scale, interpret=True,
      config=None if block_rows is None else {"block_rows": block_rows})
  tsm._check(fn, x, g, mask, scale, dtype, axis=axis)


def test_softmax_public_op_and_lowering():
  x = jnp.asarray(tsm._rng("pub").standard_normal((4, 200)), jnp.float32)
  got = ta.fast_jit(lambda x: kernels.softmax(x, implementation="mosaic_tpu", interpret=True))(x)
  np.testing.assert_allclose(got, jax.nn.softmax(x), atol=2e-6)
  f = lambda x: jax.grad(lambda x: jnp.sum(jnp.sin(kernels.softmax(
      x, implementation="mosaic_tpu"))))(x)
  assert _tpu_calls(f, x) == 2  # forward and backward kernels


def test_softmax_long_rows_fall_back_to_xla(monkeypatch):
  monkeypatch.setattr(softmax_tpu, "MAX_COLS", 128)
  monkeypatch.setattr(softmax_tpu, "_warned", set())
  x = jnp.asarray(tsm._rng("long").standard_normal((3, 200)), jnp.float32)
  with pytest.warns(UserWarning, match="rows of 200 elements exceed MAX_COLS=128"):
    got = kernels.softmax(x, implementation="mosaic_tpu", interpret=True)
  np.testing.assert_allclose(got, jax.nn.softmax(x), atol=2e-6)
  assert _tpu_calls(lambda x: kernels.softmax(x, implementation="mosaic_tpu"), x) == 0


def test_softmax_bad_block_rows():
  with pytest.raises(ValueError, match="block_rows=12 must be a multiple of 8"):
    softmax_tpu.softmax(jnp.ones((4, 5)), config={"block_rows": 12}, interpret=True)


# --- layer norm, rms norm ---------------------------------------------------------------------

@pytest.mark.parametrize("op,shape,dtype,block_rows", [
    ("layer_norm", (2, 9, 200), jnp.float32, 8),   # 18 rows -> 3 blocks; 200 -> 256 lanes
    ("rms_norm", (2, 9, 200), jnp.float32, 8),
    ("layer_norm", (5, 130), jnp.bfloat16, None),
])
def test_norms_interpret_matches_float64(op, shape, dtype, block_rows):
  x, w, b, g = tn._inputs(shape, dtype, ("mosaic", op))
  centered = op == "layer_norm"
  fn = getattr(norms_tpu, op)
  kw = dict(epsilon=tn.EPS, interpret=True,
            config=None if block_rows is None else {"block_rows": block_rows})
  params = (w, b) if centered else (w,)

  def fwd_bwd(x, params, g):
    y, vjp = jax.vjp(lambda x, p: fn(x, *p, **kw), x, params)
    return y, vjp(g)

  y, (dx, dparams) = ta.fast_jit(fwd_bwd)(x, params, g)
  assert y.dtype == x.dtype and dx.dtype == x.dtype and dparams[0].dtype == w.dtype
  want_y, want_dx, want_dw, want_db, dx_scale = tn.np_norm(
      tn._f64(x), tn._f64(w), tn._f64(b), tn._f64(g), centered)
  tol = tn.TOL[dtype]
  tn._close(y, want_y, tol, "y")
  tn._close(dx, want_dx, tol, "dx", dx_scale)
  tn._close(dparams[0], want_dw, tol, "dscale")
  if centered:
    tn._close(dparams[1], want_db, tol, "doffset")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norms_lower_for_tpu(op):
  x = jnp.ones((6, 48), jnp.bfloat16)
  w = jnp.ones((48,), jnp.bfloat16)
  params = (w, w) if op == "layer_norm" else (w,)
  fn = getattr(kernels, op)
  f = lambda x, p: jax.grad(lambda x, p: jnp.sum(fn(x, *p, implementation="mosaic_tpu")),
                            argnums=(0, 1))(x, p)
  assert _tpu_calls(f, x, params) == 2


# --- attention ----------------------------------------------------------------------------------

ATTN_BLOCKS = attn_tpu.BlockSizes(block_q=128, block_k=128)
ATTN_CASES = {
    # 3 x 3 blocks: causal block skipping (and the clamped index maps) at a ragged tail, MQA.
    "T300_causal_mqa_segments": ta.Case(t=300, b=1, n=2, k=1, d=24, causal=True,
                                        segments="packed"),
    # T != S, sliding window both sides, broadcast mask with rows that see nothing, soft cap.
    "bf16_window_mask_soft_cap_gqa": ta.Case(t=57, s=150, b=1, n=4, k=2, d=40,
                                             dtype="bfloat16", window=(20, 5), mask="bcast",
                                             soft_cap=2.0, expect_empty_rows=True),
    # Padded segments: queries whose id no key has (zero output, zero gradients). Runs through
    # the public op (its default tiles are 128 x 128 at these lengths).
    "public_op_segments_padded_empty_rows": ta.Case(t=40, s=70, b=2, n=2, d=16, segments="padded",
                                          expect_empty_rows=True),
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_interpret_matches_float64(name):
  case = ATTN_CASES[name]
  inputs = ta.make_inputs(case, ta._seed("mosaic" + name))
  q, k, v, do, bias, mask, qseg, kseg = inputs
  scale = case.d ** -0.5 if case.scale is None else case.scale
  kw = dict(scale=scale, window=common.make_window(case.causal, case.window),
            soft_cap=case.soft_cap, block_sizes=ATTN_BLOCKS, interpret=True)

  if name.startswith("public_op"):
    fn = lambda q, k, v: kernels.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=case.causal, query_segment_ids=qseg,
        kv_segment_ids=kseg, local_window_size=case.window, logits_soft_cap=case.soft_cap,
        implementation="mosaic_tpu", interpret=True)
  else:
    fn = lambda q, k, v: attn_tpu.attention(q, k, v, None, mask, qseg, kseg, **kw)

  @ta.fast_jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(do)

  got = fwd_bwd(q, k, v, do)
  want = ta.reference_result(case, inputs)
  tol = ta.TOLERANCE[case.dtype]
  for what, x, r, like in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v)):
    assert x.shape == r.shape and x.dtype == like.dtype, what
    assert np.all(np.isfinite(np.asarray(x, np.float32))), what
    err = ta.rel_err(x, r)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e} for {name}"
  visible = ta.visible_mask(case.b, case.n, case.t, case.kv_len, causal=case.causal,
                            window=case.window, mask=mask, q_seg=qseg, kv_seg=kseg)
  empty = ~visible.any(-1).transpose(0, 2, 1)
  assert empty.any() == case.expect_empty_rows
  assert np.all(np.asarray(got[0], np.float32)[empty] == 0.0)
  assert np.all(np.asarray(got[1], np.float32)[empty] == 0.0)


def test_attention_lowers_for_tpu():
  q = jnp.ones((1, 200, 4, 64), jnp.bfloat16)
  kv = jnp.ones((1, 200, 2, 64), jnp.bfloat16)
  seg = jnp.zeros((1, 200), jnp.int32)
  mask = jnp.ones((1, 1, 200, 200), bool)

  def f(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(kernels.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, query_segment_ids=seg, local_window_size=64,
        logits_soft_cap=30.0, implementation="mosaic_tpu").astype(jnp.float32)),
        argnums=(0, 1, 2))(q, k, v)

  assert _tpu_calls(f, q, kv, kv) == 3  # forward, dq, dk/dv


def test_attention_bias_falls_back_or_raises():
  q = jnp.ones((1, 16, 2, 8), jnp.float32)
  bias = jnp.zeros((1, 2, 16, 16), jnp.float32)
  with pytest.raises(ValueError, match="implementation='mosaic_tpu' cannot serve these "
                                       "arguments: a dense bias is not supported"):
    kernels.dot_product_attention(q, q, q, bias, implementation="mosaic_tpu")
  attention._warned.clear()
  with kernels.target_platform("tpu"), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
      jax.export.export(jax.jit(lambda q, b: kernels.dot_product_attention(q, q, q, b)),
                        platforms=["tpu"])(q, bias)
  messages = [str(w.message) for w in caught if "dot_product_attention" in str(w.message)]
  assert len(messages) == 1, messages
  assert "'mosaic_tpu' cannot serve these arguments (a dense bias" in messages[0]
  assert "falling back to 'xla_chunked'" in messages[0]


# --- linear cross-entropy -----------------------------------------------------------------------

def test_cross_entropy_interpret_matches_float64():
  # 37 tokens -> one block of 128; V = 300 -> 3 vocabulary blocks of 128 with a ragged tail.
  x, w, labels = tce._inputs(37, 40, 300, jnp.float32, "mosaic", n_ignored=3)
  kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
  loss_fn = lambda x, w: jnp.mean(ce_tpu.per_token_loss(
      x, w, jnp.asarray(labels), interpret=True, config={"block_n": 128, "block_v": 128},
      **kw)) * 37 / max(int(np.sum(labels != -100)), 1)
  tce._check(loss_fn, x, w, labels, jnp.float32, ls=kw["label_smoothing"], z=kw["z_loss"])


def test_cross_entropy_lowers_for_tpu():
  x, w, labels = tce._inputs(20, 16, 70, jnp.float32, "mosaic-pub")
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  f = lambda x, w: jax.grad(lambda x, w: kernels.linear_cross_entropy(
      x, w, labels, implementation="mosaic_tpu"), argnums=(0, 1))(x, w)
  assert _tpu_calls(f, xb, wb) == 3  # forward, dx, dweight


def test_cross_entropy_tiles_fit_vmem():
  # Wide rows of x take smaller tiles; every default stays within the VMEM budget.
  assert ce_tpu._geometry(8192, 512, 32768, None, 2)[:2] == (256, 512)
  assert ce_tpu._geometry(8192, 8192, 32768, None, 2)[:2] == (128, 128)
  for d in (64, 1024, 2048, 4096):
    bn, bv, _, d_p, _ = ce_tpu._geometry(8192, d, 50257, None, 2)
    assert ce_tpu._vmem_bytes(bn, bv, d_p, 2) <= ce_tpu.VMEM_BUDGET
  assert ce_tpu._geometry(8192, 512, 32768, {"block_v": 256}, 2)[:2] == (256, 256)


def test_cross_entropy_bad_block():
  x, w, labels = tce._inputs(8, 8, 8, jnp.float32, "bad")
  with pytest.raises(ValueError, match="block_v=100 must be a positive multiple of 128"):
    ce_tpu.per_token_loss(x, w, jnp.asarray(labels), config={"block_v": 100}, interpret=True)


# --- dispatch -----------------------------------------------------------------------------------

def test_target_platform_picks_mosaic_defaults():
  # The packages, not the functions of the same names that kernels/__init__ exports.
  softmax, norms, cross_entropy = (importlib.import_module(f"llmx_kernels.{m}")
                                   for m in ("softmax", "norms", "cross_entropy"))
  assert softmax.default_implementation() == "xla"  # this machine: CPU
  with kernels.target_platform("tpu"):
    assert softmax.default_implementation() == "mosaic_tpu"
    assert norms.default_implementation() == "mosaic_tpu"
    assert cross_entropy.default_implementation(8, 8) == "mosaic_tpu"
    x = jnp.ones((4, 128), jnp.float32)
    assert _tpu_calls(lambda x: kernels.softmax(x), x) == 1
  assert softmax.default_implementation() == "xla"
  with pytest.raises(ValueError, match="unknown platform 'tpuv9'"):
    with kernels.target_platform("tpuv9"):
      pass


def test_gpt_train_step_exported_for_tpu_uses_mosaic_kernels():
  optax = pytest.importorskip("optax")  # the llmx extras; kernels/ alone needs only jax
  nnx = pytest.importorskip("flax.nnx")
  from llmx.families.lm.model import GPT, GPTConfig
  from llmx.train.step import supervised
  from llmx.families.lm.recipe import lm_loss

  cfg = GPTConfig(vocab_size=67, block_size=16, n_layer=1, n_head=2, d_model=32)
  trainable = supervised(lambda: GPT(cfg, rngs=nnx.Rngs(params=0, dropout=1)),
                         optax.adamw(1e-3), lm_loss)
  state = jax.eval_shape(trainable.init)
  batch = jax.ShapeDtypeStruct((2, cfg.block_size + 1), jnp.int32)
  with kernels.target_platform("tpu"):
    exported = jax.export.export(jax.jit(trainable.train_step), platforms=["tpu"])(state, batch)
  text = exported.mlir_module()
  for kernel in ("flash_attention_fwd_tpu", "flash_attention_dq_tpu", "flash_attention_dkdv_tpu",
                 "layer_norm_fwd", "layer_norm_bwd", "linear_cross_entropy_fwd_tpu",
                 "linear_cross_entropy_dx_tpu", "linear_cross_entropy_dweight_tpu"):
    assert kernel in text, f"{kernel} missing from the TPU train step"
  assert text.count("tpu_custom_call") >= 8

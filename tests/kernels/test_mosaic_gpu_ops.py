"""Mosaic GPU (``plgpu``) softmax, RMS / layer norm and linear cross-entropy, checked on CPU.

Two gates per op, at every ``SHIPPED_CONFIG`` (JAX >= 0.11):
  1. numerics: forward and gradients in Pallas's GPU interpreter with race detection
     (``interpret=True``) at small odd shapes (padding, several row / column / vocabulary
     blocks) against float64 numpy, with the Triton tests' tolerances (imported from them);
  2. lowering: ``jax.export(..., platforms=["cuda"])`` of forward + backward, then the
     embedded kernels are decoded: sm_90, one 128-thread warpgroup, TMA copies, shared
     memory within Hopper's 227 KiB, and for cross-entropy the wgmma shape and types.
On JAX < 0.11, ``implementation="mosaic_gpu"`` raises the one-line version error instead.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels import mosaic_gpu_common as mgc
from llmx_kernels import platforms
from llmx_kernels.cross_entropy import mosaic_gpu as ce_mgpu
from llmx_kernels.norms import mosaic_gpu as norms_mgpu
from llmx_kernels.softmax import mosaic_gpu as softmax_mgpu
from tests.kernels import test_cross_entropy as tce
from tests.kernels import test_norms as tn
from tests.kernels import test_softmax as tsm

NEW = mgc.version_error() is None
new_jax = pytest.mark.skipif(not NEW, reason="Mosaic GPU kernels need JAX >= 0.11")
old_jax = pytest.mark.skipif(NEW, reason="the version error is for JAX < 0.11")

DTYPES = [jnp.float32, jnp.bfloat16]
# Each op at each shipped config, the dtypes alternating (both dtypes per op; time budget).
NORM_CASES = [(op, cfg, DTYPES[(i + j) % 2]) for i, op in enumerate(("rms_norm", "layer_norm"))
              for j, cfg in enumerate(norms_mgpu.SHIPPED_CONFIGS)]


def _ids(case):
  return "-".join(str(getattr(c, "__name__", c)) for c in case)


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _export(fn, *specs):
  """Kernel summaries of ``fn`` exported for cuda, traced with the GPU defaults."""
  with platforms.target_platform("gpu"):
    return mgc.exported_kernels(mgc.export_for_cuda(fn, *specs))


def _check_structure(summaries, count, grid_rows=None):
  assert len(summaries) == count
  for k in summaries:
    assert k.arch_major == 9, k.arch_major
    assert k.threads == 128, k.threads  # one warpgroup
    assert k.tma_copies > 0
    assert 0 < k.smem_bytes <= mgc.MAX_SMEM_BYTES, k.smem_bytes
    if grid_rows is not None:
      assert grid_rows in k.grid, k.grid


# ---------------------------------------------------------------- gate 1: numerics

@new_jax
@pytest.mark.parametrize("op,cfg,dtype", NORM_CASES, ids=[_ids(c) for c in NORM_CASES])
def test_norm_interpret(op, cfg, dtype):
  """[3, 23, 200]: 69 rows (padded to the row block), 200 columns (one or several blocks)."""
  x, w, b, g = tn._inputs((3, 23, 200), dtype, (op, "mosaic_gpu", cfg))
  centered = op == "layer_norm"
  params = (w, b) if centered else (w,)
  fn = getattr(norms_mgpu, op)

  def fwd_bwd(x, params, g):
    y, vjp = jax.vjp(lambda x, p: fn(x, *p, epsilon=tn.EPS, interpret=True, config=cfg),
                     x, params)
    return y, vjp(g)

  y, (dx, dparams) = jax.jit(fwd_bwd)(x, params, g)
  assert y.dtype == x.dtype and dx.dtype == x.dtype and dparams[0].dtype == w.dtype
  want_y, want_dx, want_dw, want_db, dx_scale = tn.np_norm(
      tn._f64(x), tn._f64(w), tn._f64(b), tn._f64(g), centered)
  tol = tn.TOL[dtype]
  tn._close(y, want_y, tol, "y")
  tn._close(dx, want_dx, tol, "dx", dx_scale)
  tn._close(dparams[0], want_dw, tol, "dscale")
  if centered:
    tn._close(dparams[1], want_db, tol, "doffset")


@new_jax
@pytest.mark.parametrize("cfg", softmax_mgpu.SHIPPED_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_softmax_interpret(cfg, dtype):
  """69 x 200, masked (an all-masked row included), scale 0.5."""
  x, g, mask = tsm._inputs(69, 200, dtype, True, ("mosaic_gpu", cfg))
  tsm._check(lambda a: softmax_mgpu.softmax(a, mask, scale=0.5, interpret=True, config=cfg),
             x, g, mask, 0.5, dtype)


@new_jax
def test_softmax_public_op_default_blocks():
  """Through ``kernels.softmax`` (heuristic config), softmax over two leading axes."""
  x, g, _ = tsm._inputs(6, 35, jnp.float32, False, "public")
  x, g = x.reshape(6, 5, 7), g.reshape(6, 5, 7)
  tsm._check(lambda a: kernels.softmax(a, axis=(1, 2), implementation="mosaic_gpu",
                                       interpret=True), x, g, None, 1.0, jnp.float32,
             axis=(1, 2))


@new_jax
@pytest.mark.parametrize("cfg,kw", [
    (ce_mgpu.SHIPPED_CONFIGS[0], {}),
    (ce_mgpu.SHIPPED_CONFIGS[1], {"ls": 0.1, "z": 1e-2}),  # 2 vocab splits, 2 token chunks
], ids=["cfg0", "cfg1-smoothing-zloss"])
def test_cross_entropy_interpret(cfg, kw):
  """N=150 (padded; ignored tokens), D=100, V=200 (padded vocabulary masked), bfloat16."""
  x, w, labels = tce._inputs(150, 100, 200, jnp.bfloat16, ("mosaic_gpu", cfg), n_ignored=3)
  count = max(int(np.sum(labels != -100)), 1)

  def mean_loss(a, b):
    per_token = ce_mgpu.per_token_loss(a, b, labels, label_smoothing=kw.get("ls", 0.0),
                                       z_loss=kw.get("z", 0.0), interpret=True, config=cfg)
    return jnp.sum(per_token) / count

  tce._check(mean_loss, x, w, labels, jnp.bfloat16, **kw)


# ---------------------------------------------------------------- gate 2: lowering

@new_jax
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("cfg", norms_mgpu.SHIPPED_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", norms_mgpu.DTYPES, ids=lambda d: d.__name__)
def test_norm_exports_for_cuda(op, cfg, dtype):
  n, d = 200, 300
  fn = getattr(norms_mgpu, op)
  n_params = 2 if op == "layer_norm" else 1

  def fwd_bwd(x, *p):
    y, vjp = jax.vjp(lambda x, *p: fn(x, *p, config=cfg), x, *p)
    return y, vjp(y)

  kernels_ = _export(fwd_bwd, _spec((n, d), dtype), *[_spec((d,), dtype)] * n_params)
  _check_structure(kernels_, 2, grid_rows=-(-n // cfg.block_rows))


@new_jax
@pytest.mark.parametrize("cfg", softmax_mgpu.SHIPPED_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", softmax_mgpu.DTYPES, ids=lambda d: d.__name__)
def test_softmax_exports_for_cuda(cfg, dtype):
  def fwd_bwd(x):
    y, vjp = jax.vjp(lambda x: softmax_mgpu.softmax(x, config=cfg), x)
    return vjp(y)

  _check_structure(_export(fwd_bwd, _spec((200, 1000), dtype)), 2,
                   grid_rows=-(-200 // cfg.block_rows))


@new_jax
@pytest.mark.parametrize("cfg", ce_mgpu.SHIPPED_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", ce_mgpu.DTYPES, ids=lambda d: d.__name__)
def test_cross_entropy_exports_for_cuda(cfg, dtype):
  """Forward, dlogits, dx and dweight kernels (one token chunk: a lax.scan's kernels sit
  inside a loop the summary does not walk)."""
  labels = jnp.zeros((100,), jnp.int32)

  def fwd_bwd(x, w):
    return jax.grad(lambda x, w: ce_mgpu.per_token_loss(x, w, labels, config=cfg).sum(),
                    argnums=(0, 1))(x, w)

  ks = _export(fwd_bwd, _spec((100, 256), dtype), _spec((256, 1000), dtype))
  _check_structure(ks, 4)
  kind = jnp.dtype(dtype).name.replace("float", "f")  # bf16, f16
  types = {f"f32.{kind}.{kind}"}
  logits_kernels, matmul_kernels = ks[:2], ks[2:]
  for k in logits_kernels:
    assert k.wgmma_shapes == {f"m64n{cfg.block_v}k16"} and k.wgmma_types == types
  for k in matmul_kernels:
    assert k.wgmma_shapes == {f"m64n{ce_mgpu.MM_N}k16"} and k.wgmma_types == types


# ---------------------------------------------------------------- errors, defaults

@new_jax
def test_bad_inputs_raise_one_line_errors():
  x = jnp.ones((4, 64), jnp.float32)
  calls = {
      "softmax": lambda: kernels.softmax(x, implementation="mosaic_gpu"),
      "rms_norm": lambda: kernels.rms_norm(x, None, implementation="mosaic_gpu"),
      "linear_cross_entropy": lambda: kernels.linear_cross_entropy(
          x.astype(jnp.bfloat16), jnp.ones((64, 8), jnp.bfloat16), jnp.zeros((4,), jnp.int32),
          implementation="mosaic_gpu"),
  }
  for op, call in calls.items():  # no GPU and no interpret=True
    with pytest.raises(ValueError, match=rf"^{op}: .*runs on NVIDIA GPUs.*not on 'cpu'") as e:
      call()
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="dtype float32 is not supported .bfloat16, float16"):
    kernels.linear_cross_entropy(x, jnp.ones((64, 8)), jnp.zeros((4,), jnp.int32),
                                 implementation="mosaic_gpu", interpret=True)
  f8 = x.astype(jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="dtype float8_e4m3fn is not supported"):
    kernels.softmax(f8, implementation="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="block_cols=100 must be a multiple of 64"):
    softmax_mgpu.softmax(x, interpret=True, config={"block_cols": 100})
  with pytest.raises(ValueError, match="block_v=96 must be 64, 128 or 256"):
    ce_mgpu.per_token_loss(x.astype(jnp.bfloat16), jnp.ones((64, 8), jnp.bfloat16),
                           jnp.zeros((4,), jnp.int32), interpret=True, config={"block_v": 96})


@new_jax
def test_gpu_default_falls_back_to_triton_when_mosaic_cannot_serve():
  import importlib  # the packages (kernels.softmax etc. are the functions)
  norms = importlib.import_module("llmx_kernels.norms")
  softmax = importlib.import_module("llmx_kernels.softmax")
  from llmx_kernels.norms import triton as norms_triton
  from llmx_kernels.softmax import triton as softmax_triton
  with platforms.target_platform("gpu"):
    assert softmax.default_implementation() == "mosaic_gpu"
    x = jnp.ones((4, 64), jnp.float32)
    assert softmax.get_implementation(None, x) is softmax_mgpu.softmax
    assert softmax.get_implementation(None, x.astype(jnp.float8_e4m3fn)) is (
        softmax_triton.softmax)
    assert norms.get_implementation("rms_norm", None, (x, None)) is norms_mgpu.rms_norm
    assert norms.get_implementation("rms_norm", None, (x.astype(jnp.float8_e4m3fn), None)) is (
        norms_triton.rms_norm)
  assert platforms.gpu_fallback("mosaic_gpu", False, lambda: "float32") == "triton"
  assert platforms.gpu_fallback("mosaic_gpu", True, lambda: "float32") == "mosaic_gpu"
  assert platforms.gpu_fallback("mosaic_gpu", False, lambda: None) == "mosaic_gpu"


def test_pallas_default_rule():
  assert platforms.MOSAIC_GPU_MIN_JAX == mgc.MIN_JAX
  assert platforms.pallas_default("gpu") == ("mosaic_gpu" if NEW else "triton")
  assert platforms.pallas_default("cuda") == platforms.pallas_default("gpu")
  assert platforms.pallas_default("tpu") == "mosaic_tpu"
  assert platforms.pallas_default("cpu") is None


@new_jax
def test_autotune_candidates_fit_and_include_shipped():
  for mod, dims, dtype in ((softmax_mgpu, (4096, 4096), jnp.bfloat16),
                           (norms_mgpu, (4096, 4096), jnp.float32),
                           (ce_mgpu, (8192, 4096, 32768), jnp.bfloat16)):
    for kind in ("fwd", "bwd"):
      cands = mod.autotune_candidates(kind, dims, dtype)
      assert cands and all(mod.config_problem(kind, c, dtype) is None for c in cands)
      assert mod.heuristic_config(kind, dims, dtype) in cands or kind == "fwd"
      assert all(isinstance(c.as_dict(), dict) for c in cands)


@old_jax
def test_old_jax_gives_one_line_version_error():
  x = jnp.ones((4, 64), jnp.bfloat16)
  calls = [lambda: kernels.softmax(x, implementation="mosaic_gpu", interpret=True),
           lambda: kernels.rms_norm(x, None, implementation="mosaic_gpu", interpret=True),
           lambda: kernels.layer_norm(x, None, None, implementation="mosaic_gpu", interpret=True),
           lambda: kernels.linear_cross_entropy(x, jnp.ones((64, 8), jnp.bfloat16),
                                                jnp.zeros((4,), jnp.int32),
                                                implementation="mosaic_gpu", interpret=True)]
  for call in calls:
    with pytest.raises(ValueError, match=r"needs JAX >= 0\.11") as e:
      call()
    assert "\n" not in str(e.value)

"""kernels.linear_cross_entropy against float64 numpy, loss and gradients for x and weight.

Tolerances (max abs error divided by the largest float64 magnitude of each output):
  float32: 1e-5 (loss), 2e-5 (dx, dweight)
  bfloat16 inputs (float32 accumulation): 2e-2 (loss and gradients)
The references use the bf16-rounded inputs, so the error measured is the kernels' own.
The Triton kernels run in Pallas interpret mode on CPU and are lowered for CUDA.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels import cross_entropy as ce
from llmx_kernels.triton_common import lower_for_cuda
from llmx_kernels.cross_entropy import triton as ce_triton
from llmx_kernels.cross_entropy import xla_chunked as ce_chunked

TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2)}


def _rng(*tag):
  return np.random.default_rng(zlib.crc32(repr(tag).encode()))


def np_lce(x, w, labels, *, ignore_index=-100, ls=0.0, z=0.0, reduction="mean"):
  """float64 loss and analytic (dx, dw) of the reduced loss (cotangent 1 or ones)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, v = x.shape[0], w.shape[1]
  logits = x @ w
  m = logits.max(1, keepdims=True)
  e = np.exp(logits - m)
  lse = (m + np.log(e.sum(1, keepdims=True)))[:, 0]
  valid = labels != ignore_index
  safe = np.where(valid, labels, 0)
  ll = logits[np.arange(n), safe]
  loss = np.where(valid, lse - (1 - ls) * ll - ls * logits.mean(1) + z * lse ** 2, 0.0)
  count = max(valid.sum(), 1)
  g = np.where(valid, 1.0 / count if reduction == "mean" else 1.0, 0.0)
  onehot = np.zeros_like(logits)
  onehot[np.arange(n), safe] = 1.0
  dz = ((1 + 2 * z * lse)[:, None] * e / e.sum(1, keepdims=True) - (1 - ls) * onehot - ls / v)
  dz = dz * g[:, None]
  out = {"mean": loss.sum() / count, "sum": loss.sum(), "none": loss}[reduction]
  return out, dz @ w.T, x.T @ dz


def _inputs(n, d, v, dtype, tag, n_ignored=1):
  rng = _rng(n, d, v, tag)
  x = jnp.asarray(rng.standard_normal((n, d)), dtype)
  w = jnp.asarray(rng.standard_normal((d, v)) * (2.0 / np.sqrt(d)), dtype)
  labels = rng.integers(0, v, n)
  labels[rng.permutation(n)[:n_ignored]] = -100
  return x, w, labels.astype(np.int32)


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _close(got, want, tol, what):
  got = _f64(got)
  assert got.shape == np.shape(want), what
  assert np.all(np.isfinite(got)), what
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
  assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _check(loss_fn, x, w, labels, dtype, *, reduction="mean", **kw):
  """loss_fn(x, w) -> reduced loss; compares loss, dx and dweight to float64."""
  want, want_dx, want_dw = np_lce(_f64(x), _f64(w), labels, reduction=reduction, **kw)

  def fwd_bwd(x, w):
    out, vjp = jax.vjp(loss_fn, x, w)
    return out, vjp(jnp.where(jnp.asarray(labels) == -100, 0.0, 1.0)
                    if reduction == "none" else jnp.ones_like(out))

  out, (dx, dw) = jax.jit(fwd_bwd)(x, w)
  assert out.dtype == jnp.float32 and dx.dtype == x.dtype and dw.dtype == w.dtype
  ltol, gtol = TOL[dtype]
  _close(out, want, ltol, "loss")
  _close(dx, want_dx, gtol, "dx")
  _close(dw, want_dw, gtol, "dweight")


IMPLS = [("xla", {}), ("xla_chunked", {}), ("triton", {"interpret": True})]


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
@pytest.mark.parametrize("n,d,v", [(1, 16, 7), (37, 24, 300)])
def test_matches_float64(impl, kw, n, d, v):
  x, w, labels = _inputs(n, d, v, jnp.float32, impl, n_ignored=0 if n == 1 else 3)
  _check(lambda a, b: kernels.linear_cross_entropy(a, b, labels, implementation=impl, **kw),
         x, w, labels, jnp.float32)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_smoothing_z_loss_ignore_index(impl, kw):
  x, w, labels = _inputs(29, 16, 130, jnp.float32, "ls", n_ignored=5)
  _check(lambda a, b: kernels.linear_cross_entropy(a, b, labels, label_smoothing=0.1,
                                                   z_loss=1e-3, implementation=impl, **kw),
         x, w, labels, jnp.float32, ls=0.1, z=1e-3)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_gpt2_vocab(impl, kw):
  """V = 50257 (no power of two divides it), tiny N and D."""
  x, w, labels = _inputs(5, 8, 50257, jnp.float32, "gpt2")
  _check(lambda a, b: kernels.linear_cross_entropy(a, b, labels, label_smoothing=0.05,
                                                   implementation=impl, **kw),
         x, w, labels, jnp.float32, ls=0.05)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
  x, w, labels = _inputs(13, 8, 50, jnp.float32, reduction, n_ignored=4)
  for impl, kw in IMPLS:
    out = jax.jit(lambda a, b: kernels.linear_cross_entropy(
        a, b, labels, reduction=reduction, implementation=impl, **kw))(x, w)
    assert out.shape == (() if reduction == "sum" else (13,))
    _close(out, np_lce(_f64(x), _f64(w), labels, reduction=reduction)[0], 1e-5, impl)
  if reduction == "none":
    assert np.all(np.asarray(out)[labels == -100] == 0)


def test_chunked_ragged_chunks():
  """N not a multiple of the token chunk, V not a multiple of the vocab chunk."""
  x, w, labels = _inputs(37, 12, 1000, jnp.float32, "ragged", n_ignored=3)
  cfg = {"token_chunk": 16, "vocab_chunk": 96}
  _check(lambda a, b: ce_chunked.per_token_loss(a, b, jnp.asarray(labels), label_smoothing=0.2,
                                                z_loss=1e-2, config=cfg).sum() / 34.0,
         x, w, labels, jnp.float32, ls=0.2, z=1e-2)


def test_triton_small_blocks_and_vocab_splits():
  """Several token blocks (ragged), vocab blocks, D blocks and vocab splits."""
  x, w, labels = _inputs(37, 40, 300, jnp.float32, "blocks", n_ignored=2)
  cfg = {"block_n": 16, "block_v": 32, "block_d": 16, "v_splits": 3}
  _check(lambda a, b: ce_triton.per_token_loss(a, b, jnp.asarray(labels), z_loss=1e-3,
                                               interpret=True, config=cfg).sum() / 35.0,
         x, w, labels, jnp.float32, z=1e-3)


@pytest.mark.parametrize("impl,kw", IMPLS[1:], ids=[i for i, _ in IMPLS[1:]])
def test_bf16(impl, kw):
  x, w, labels = _inputs(21, 32, 200, jnp.bfloat16, "bf16", n_ignored=2)
  _check(lambda a, b: kernels.linear_cross_entropy(a, b, labels, label_smoothing=0.1,
                                                   implementation=impl, **kw),
         x, w, labels, jnp.bfloat16, ls=0.1)


def test_all_ignored_and_ignore_index_that_is_a_class():
  x, w, labels = _inputs(6, 8, 20, jnp.float32, "ign")
  labels = np.full(6, -100, np.int32)
  for impl, kw in IMPLS:
    loss, (dx, dw) = jax.jit(jax.value_and_grad(
        lambda a, b: kernels.linear_cross_entropy(a, b, labels, implementation=impl, **kw),
        (0, 1)))(x, w)
    assert float(loss) == 0.0 and not np.any(np.asarray(dx)) and not np.any(np.asarray(dw))
  labels = np.array([0, 3, 0, 5, 19, 0], np.int32)  # class 0 is the padding id here
  want = np_lce(_f64(x), _f64(w), labels, ignore_index=0)[0]
  for impl, kw in IMPLS:
    got = jax.jit(lambda a, b: kernels.linear_cross_entropy(
        a, b, labels, ignore_index=0, implementation=impl, **kw))(x, w)
    _close(got, want, 1e-5, impl)


def test_default_implementation():
  # Mosaic GPU from JAX 0.11 (kernels/platforms.py), Triton below.
  gpu = "mosaic_gpu" if tuple(map(int, jax.__version__.split(".")[:2])) >= (0, 11) else "triton"
  assert ce.default_implementation(1024, 1024, backend="gpu") == gpu
  assert ce.default_implementation(64, 1 << 18, backend="cpu") == "xla"  # 2**24 logits
  assert ce.default_implementation(65, 1 << 18, backend="cpu") == "xla_chunked"
  assert ce.default_implementation(8192, 32768, backend="tpu") == "mosaic_tpu"


def test_bad_inputs():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 10))
  labels = jnp.array([1, 2, 3, -100])
  lce = kernels.linear_cross_entropy
  with pytest.raises(ValueError, match=r"x.shape\[1\]=8 does not match weight.shape\[0\]=9"):
    lce(x, jnp.ones((9, 10)), labels)
  with pytest.raises(ValueError, match=r"labels.shape\[0\]=3 does not match x.shape\[0\]=4"):
    lce(x, w, labels[:3])
  with pytest.raises(ValueError, match=r"x must be 2-D \[N, D\], got shape \(2, 2, 8\)"):
    lce(jnp.ones((2, 2, 8)), w, labels)
  with pytest.raises(ValueError, match=r"weight must be 2-D"):
    lce(x, jnp.ones(8), labels)
  with pytest.raises(ValueError, match=r"labels must be 1-D"):
    lce(x, w, labels[:, None])
  with pytest.raises(ValueError, match=r"labels out of range \[0, 10\): labels\[1\]=10"):
    lce(x, w, jnp.array([1, 10, -1, -100]))
  with pytest.raises(ValueError, match=r"labels\[0\]=-1"):
    lce(x, w, np.array([-1, 1, 2, 3]))
  with pytest.raises(TypeError, match="x must be floating-point, got dtype int32"):
    lce(jnp.ones((4, 8), jnp.int32), w, labels)
  with pytest.raises(TypeError, match="weight must be floating-point"):
    lce(x, jnp.ones((8, 10), jnp.int8), labels)
  with pytest.raises(TypeError, match="labels must be integers, got dtype float32"):
    lce(x, w, jnp.ones(4))
  with pytest.raises(ValueError, match="reduction='avg'"):
    lce(x, w, labels, reduction="avg")
  with pytest.raises(ValueError, match=r"label_smoothing=1.5 must be in \[0.0, 1.0\]"):
    lce(x, w, labels, label_smoothing=1.5)
  with pytest.raises(ValueError, match="z_loss=-0.1"):
    lce(x, w, labels, z_loss=-0.1)
  with pytest.raises(ValueError, match="unknown implementation='cublas'"):
    lce(x, w, labels, implementation="cublas")


def test_out_of_range_label_under_jit_is_nan():
  x, w = jnp.ones((3, 8)), jnp.ones((8, 10))
  f = jax.jit(lambda l: kernels.linear_cross_entropy(x, w, l, reduction="none"))
  out = np.asarray(f(jnp.array([1, 10, -100])))
  assert np.isfinite(out[0]) and np.isnan(out[1]) and out[2] == 0


def test_triton_lowers_for_cuda():
  """Forward and backward lower for CUDA at V = 50257 (bf16), and float32."""
  s = jax.ShapeDtypeStruct
  for dtype in (jnp.bfloat16, jnp.float32):
    f = jax.value_and_grad(
        lambda x, w, l: kernels.linear_cross_entropy(x, w, l, label_smoothing=0.1, z_loss=1e-4,
                                                     implementation="triton"), (0, 1))
    text = lower_for_cuda(f, s((1000, 512), dtype), s((512, 50257), dtype), s((1000,), jnp.int32))
    assert text.count("__gpu$xla.gpu.triton") == 2

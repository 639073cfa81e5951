"""kernels.softmax against a float64 numpy reference, forward and gradient.

Tolerances (max abs error on probabilities, which lie in [0, 1], and on gradients
scaled by their largest float64 magnitude):
  float32: 2e-6 (probabilities), 2e-5 relative (gradients)
  bfloat16: 1e-2 (8-bit mantissa: ~4e-3 per rounding), 3e-2 relative (gradients)
The Triton kernels run in Pallas interpret mode on CPU and are lowered for CUDA.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels.triton_common import lower_for_cuda
from llmx_kernels.softmax import triton as softmax_triton

TOL = {jnp.float32: (2e-6, 2e-5), jnp.bfloat16: (1e-2, 3e-2)}


def _rng(*tag):
  return np.random.default_rng(zlib.crc32(repr(tag).encode()))


def np_softmax(x, mask, scale, axis):
  z = np.asarray(x, np.float64) * scale
  if mask is not None:
    z = np.where(mask, z, -np.inf)
  m = np.max(z, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(z - m)
  s = np.sum(e, axis=axis, keepdims=True)
  return e / np.where(s == 0, 1.0, s)


def np_softmax_grad(p, g, scale, axis):
  return scale * p * (g - np.sum(p * g, axis=axis, keepdims=True))


def _inputs(rows, cols, dtype, masked, tag):
  rng = _rng(rows, cols, masked, tag)
  x = rng.standard_normal((rows, cols)) * 3.0
  g = rng.standard_normal((rows, cols))
  mask = None
  if masked:
    mask = rng.random((rows, cols)) < 0.7
    mask[0] = False  # a row with nothing allowed
  return jnp.asarray(x, dtype), jnp.asarray(g, jnp.float32), mask


def _check(fn, x, g, mask, scale, dtype, axis=-1):
  atol, rtol = TOL[dtype]
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  want = np_softmax(xf, mask, scale, axis)
  def fwd_bwd(a, ct):
    out, vjp = jax.vjp(fn, a)
    return out, vjp(ct.astype(out.dtype))[0]
  out, dx = jax.jit(fwd_bwd)(x, g)
  assert out.dtype == x.dtype and out.shape == x.shape
  got = np.asarray(out.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=atol, rtol=0)
  want_dx = np_softmax_grad(want, np.asarray(g.astype(out.dtype).astype(jnp.float32), np.float64),
                            scale, axis)
  got_dx = np.asarray(dx.astype(jnp.float32), np.float64)
  scale_dx = max(np.max(np.abs(want_dx)), 1e-30)
  assert np.max(np.abs(got_dx - want_dx)) / scale_dx < rtol
  if mask is not None:
    mask = np.broadcast_to(mask, x.shape)
    assert np.all(got[~mask] == 0) and np.all(got_dx[~mask] == 0)
    empty = np.broadcast_to(~mask.any(axis=axis, keepdims=True), x.shape)
    assert np.all(got[empty] == 0)


@pytest.mark.parametrize("cols", [1, 7, 1000, 5000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_xla_matches_float64(cols, dtype, masked):
  x, g, mask = _inputs(5, cols, dtype, masked, "xla")
  where = None if mask is None else jnp.asarray(mask)
  _check(lambda a: kernels.softmax(a, where=where, scale=0.8, implementation="xla"), x, g, mask,
         0.8, dtype)


@pytest.mark.parametrize("cols,dtype,masked", [
    (1, jnp.float32, True), (7, jnp.float32, True), (1000, jnp.float32, True),
    (5000, jnp.float32, False), (1000, jnp.bfloat16, True)])
def test_triton_interpret_matches_float64(cols, dtype, masked):
  x, g, mask = _inputs(9, cols, dtype, masked, "triton")
  where = None if mask is None else jnp.asarray(mask)
  _check(lambda a: kernels.softmax(a, where=where, scale=1.3, implementation="triton",
                                   interpret=True), x, g, mask, 1.3, dtype)


def test_triton_long_rows_blocked_online():
  """Rows longer than one block: the online max/sum path (several blocks, ragged end)."""
  x, g, mask = _inputs(5, 1000, jnp.float32, True, "blocked")
  cfg = {"block_rows": 2, "block_cols": 128}
  assert softmax_triton.resolve_config("fwd", (5, 1000), jnp.float32, cfg)["block_cols"] == 128
  _check(lambda a: softmax_triton.softmax(a, jnp.asarray(mask), axis=(1,), scale=0.5,
                                          interpret=True, config=cfg), x, g, mask, 0.5,
         jnp.float32)


def test_heuristic_blocks_long_rows_without_one_power_of_two_block():
  cfg = softmax_triton.heuristic_config("fwd", (8, 50257), jnp.float32)
  assert cfg["block_cols"] < 50257  # blocked, not next_power_of_2(row)
  assert softmax_triton.heuristic_config("fwd", (4096, 7), jnp.bfloat16)["block_cols"] == 8


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_axis_and_tuple_axis(impl):
  rng = _rng("axis", impl)
  x = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  mask = rng.random((1, 4, 5)) < 0.8
  for axis in (0, (0, 2)):
    _check(lambda a: kernels.softmax(a, axis=axis, where=jnp.asarray(mask), implementation=impl,
                                     interpret=True), x, g, mask, 1.0, jnp.float32, axis=axis)


def test_matches_jax_nn_softmax():
  rng = _rng("jax.nn")
  x = jnp.asarray(rng.standard_normal((4, 33)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 33)) < 0.5)
  np.testing.assert_allclose(kernels.softmax(x, where=mask), jax.nn.softmax(x, where=mask),
                             atol=1e-6)
  np.testing.assert_allclose(kernels.softmax(x, axis=0), jax.nn.softmax(x, axis=0), atol=1e-6)


def test_bad_inputs():
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match="x must be a floating-point array, got dtype int32"):
    kernels.softmax(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(TypeError, match="where must be a boolean array"):
    kernels.softmax(x, where=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"where shape \(2, 4\) is not broadcastable"):
    kernels.softmax(x, where=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    kernels.softmax(x, axis=2)
  with pytest.raises(ValueError, match="repeated axis"):
    kernels.softmax(x, axis=(1, -1))
  with pytest.raises(ValueError, match="implementation='cuda'"):
    kernels.softmax(x, implementation="cuda")
  with pytest.raises(TypeError, match="scale must be a static Python number"):
    kernels.softmax(x, scale=jnp.float32(2.0))
  with pytest.raises(ValueError, match="scalar"):
    kernels.softmax(jnp.float32(1.0))


@pytest.mark.parametrize("shape", [(37, 1000), (4, 20000)])
def test_triton_lowers_for_cuda(shape):
  """Forward and backward Triton kernels lower for CUDA from CPU (bf16, masked)."""
  def f(x, mask):
    return jax.value_and_grad(
        lambda a: kernels.softmax(a, where=mask, scale=0.125, implementation="triton")
        .astype(jnp.float32).sum())(x)
  text = lower_for_cuda(f, jax.ShapeDtypeStruct(shape, jnp.bfloat16),
                        jax.ShapeDtypeStruct(shape, jnp.bool_))
  assert text.count("__gpu$xla.gpu.triton") == 2

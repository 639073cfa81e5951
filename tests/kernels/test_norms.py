"""kernels.layer_norm and kernels.rms_norm against float64 numpy, forward and gradients.

Tolerances, as max abs error divided by the largest float64 magnitude of each output
(for dx: of the terms ``dy * scale * rstd`` it is a difference of):
  float32: 2e-5 (y, dx, dscale, doffset)
  bfloat16: 2e-2 for y and dx (8-bit mantissa); 2e-2 for dscale/doffset (sums over rows
  of bf16 cotangents, accumulated in float32)
The Triton kernels run in Pallas interpret mode on CPU and are lowered for CUDA.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels.triton_common import lower_for_cuda
from llmx_kernels.norms import triton as norms_triton

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
EPS = 1e-6


def _rng(*tag):
  return np.random.default_rng(zlib.crc32(repr(tag).encode()))


def np_norm(x, w, b, g, centered, eps=EPS):
  """float64 forward and analytic gradients (dx, dscale, doffset)."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  d = x.shape[-1]
  mean = x.mean(-1, keepdims=True) if centered else 0.0
  xc = x - mean
  rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
  xhat = xc * rstd
  y = xhat * w + (np.asarray(b, np.float64) if centered else 0.0)
  wg = g * w
  dx = wg - xhat * (wg * xhat).sum(-1, keepdims=True) / d
  if centered:
    dx = dx - wg.sum(-1, keepdims=True) / d
  dx = dx * rstd
  lead = tuple(range(x.ndim - 1))
  # dx is a difference of terms of size |wg * rstd|; errors are relative to that
  # (for d = 1 the true dx is ~0 and cancellation is all there is).
  dx_scale = np.max(np.abs(wg * rstd))
  return y, dx, (g * xhat).sum(lead), g.sum(lead) if centered else None, dx_scale


def _inputs(shape, dtype, tag):
  rng = _rng(shape, tag)
  d = shape[-1]
  x = rng.standard_normal(shape) * 2.0 + 0.5
  w = 1.0 + 0.3 * rng.standard_normal(d)
  b = 0.3 * rng.standard_normal(d)
  g = rng.standard_normal(shape)
  cast = lambda a: jnp.asarray(a, dtype)
  return cast(x), cast(w), cast(b), cast(g)


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _close(got, want, tol, what, scale=None):
  got = _f64(got)
  assert got.shape == want.shape, what
  assert np.all(np.isfinite(got)), what
  scale = np.max(np.abs(want)) if scale is None else scale
  err = np.max(np.abs(got - want)) / max(scale, 1e-6)
  assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _check(op, impl, shape, dtype, config=None, tag=""):
  x, w, b, g = _inputs(shape, dtype, (op, impl, tag))
  centered = op == "layer_norm"
  if impl == "triton":
    fn = getattr(norms_triton, op)
    kw = {"interpret": True, "config": config, "epsilon": EPS}
  else:
    fn = getattr(kernels, op)
    kw = {"implementation": impl, "epsilon": EPS}
  params = (w, b) if centered else (w,)

  def fwd_bwd(x, params, g):
    y, vjp = jax.vjp(lambda x, p: fn(x, *p, **kw), x, params)
    return y, vjp(g)

  y, (dx, dparams) = jax.jit(fwd_bwd)(x, params, g)
  assert y.dtype == x.dtype and dx.dtype == x.dtype and dparams[0].dtype == w.dtype
  want_y, want_dx, want_dw, want_db, dx_scale = np_norm(_f64(x), _f64(w), _f64(b), _f64(g), centered)
  tol = TOL[dtype]
  _close(y, want_y, tol, "y")
  _close(dx, want_dx, tol, "dx", dx_scale)
  _close(dparams[0], want_dw, tol, "dscale")
  if centered:
    _close(dparams[1], want_db, tol, "doffset")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("d", [1, 7, 1000, 5000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_matches_float64(op, d, dtype):
  _check(op, "xla", (3, 5, d), dtype)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("d", [1, 7, 1000, 5000])
def test_triton_interpret_matches_float64(op, d):
  _check(op, "triton", (11, d), jnp.float32)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_triton_interpret_bf16(op):
  _check(op, "triton", (2, 3, 1000), jnp.bfloat16)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_triton_long_rows_blocked(op):
  """Rows longer than one block: blocked statistics, separate dx and dscale kernels."""
  _check(op, "triton", (13, 1000), jnp.float32,
         config={"block_rows": 2, "block_cols": 256, "row_groups": 3}, tag="blocked")


def test_triton_row_groups_cover_all_rows():
  """More row blocks than row groups: each program walks several row blocks."""
  _check("layer_norm", "triton", (37, 7), jnp.float32,
         config={"block_rows": 4, "block_cols": 8, "row_groups": 3}, tag="groups")


def test_statistics_in_float32_for_bf16():
  """A large common offset cancels only if the mean and variance are float32."""
  rng = _rng("offset")
  x = jnp.asarray(300.0 + rng.standard_normal((4, 256)), jnp.bfloat16)
  for impl in ("xla", "triton"):
    y = kernels.layer_norm(x, None, None, implementation=impl, interpret=True)
    want = np_norm(_f64(x), np.ones(256), np.zeros(256), np.zeros((4, 256)), True)[0]
    _close(y, want, 2e-2, impl)


def test_none_scale_and_offset():
  rng = _rng("none")
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
  ones, zeros = jnp.ones(16), jnp.zeros(16)
  np.testing.assert_allclose(kernels.layer_norm(x, None, None),
                             kernels.layer_norm(x, ones, zeros), atol=1e-6)
  np.testing.assert_allclose(kernels.rms_norm(x, None), kernels.rms_norm(x, ones), atol=1e-6)


def test_bad_inputs():
  x = jnp.ones((2, 4))
  w = jnp.ones(4)
  with pytest.raises(TypeError, match="layer_norm: x must be a floating-point array"):
    kernels.layer_norm(jnp.ones((2, 4), jnp.int32), w, w)
  with pytest.raises(ValueError, match=r"scale must have shape \(4,\).*got \(5,\)"):
    kernels.layer_norm(x, jnp.ones(5), w)
  with pytest.raises(ValueError, match=r"offset must have shape \(4,\)"):
    kernels.layer_norm(x, w, jnp.ones((1, 4)))
  with pytest.raises(TypeError, match="rms_norm: scale must be a floating-point array"):
    kernels.rms_norm(x, jnp.ones(4, jnp.int32))
  with pytest.raises(ValueError, match="rms_norm: epsilon must be a non-negative"):
    kernels.rms_norm(x, w, epsilon=-1.0)
  with pytest.raises(ValueError, match="unknown implementation='pallas'"):
    kernels.rms_norm(x, w, implementation="pallas")


@pytest.mark.parametrize("d", [1000, 20000])
def test_triton_lowers_for_cuda(d):
  """Forward and backward lower for CUDA (one-block rows: fused bwd; long rows: two kernels)."""
  s = jax.ShapeDtypeStruct
  for op in ("layer_norm", "rms_norm"):
    n_params = 2 if op == "layer_norm" else 1

    def f(x, *params, op=op):
      return jax.grad(lambda x, *p: getattr(kernels, op)(x, *p, implementation="triton")
                      .astype(jnp.float32).sum(), argnums=tuple(range(1 + n_params)))(x, *params)

    text = lower_for_cuda(f, s((37, d), jnp.bfloat16), *[s((d,), jnp.float32)] * n_params)
    assert text.count("__gpu$xla.gpu.triton") == (2 if d <= 8192 else 3)

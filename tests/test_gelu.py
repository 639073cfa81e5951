"""llmx.nn.gelu against float64 formulas: value, first and second derivative, tails included."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx.nn.gelu import gelu


def _exact64(x):
  x = np.asarray(x, np.float64)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  return x * cdf, cdf + x * pdf, pdf * (2 - x * x)


def _close(got, want, x):
  """|got - want| <= 2e-6 |want| + 1.2e-7 max(1, |x|): float32 rounding, where in the negative
  tail 1 + erf(x / sqrt 2) rounds to a multiple of float32's spacing near 1 (the erfc form keeps
  relative accuracy there; absolute error below 4e-7 either way)."""
  err = np.abs(np.asarray(got, np.float64) - want)
  bound = 2e-6 * np.abs(want) + 1.2e-7 * np.maximum(1, np.abs(np.asarray(x, np.float64)))
  assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("shape", [(37,), (5, 131)])
def test_exact_gelu_matches_float64(shape):
  x = jax.random.normal(jax.random.key(sum(shape)), shape) * 3
  x = x.at[..., :6].set(jnp.array([0.0, -0.0, 9.5, -9.5, 30.0, -30.0]))  # zero and the tails
  value, first, second = _exact64(x)
  _close(gelu(x), value, x)
  grad = jax.vmap(jax.grad(gelu)) if len(shape) == 1 else jax.vmap(jax.vmap(jax.grad(gelu)))
  _close(grad(x), first, x)
  grad2 = jax.grad(jax.grad(gelu))
  for i in (0, 2, 7, 11):
    xi = x.reshape(-1)[i]
    np.testing.assert_allclose(grad2(xi), second.reshape(-1)[i], rtol=1e-5, atol=1e-6)
  # The same function jax.nn computes through erfc, within float32 rounding.
  _close(gelu(x), np.asarray(jax.nn.gelu(x, approximate=False), np.float64), x)


def test_approximate_is_the_tanh_form():
  x = jnp.linspace(-6, 6, 101)
  np.testing.assert_array_equal(gelu(x, approximate=True), jax.nn.gelu(x, approximate=True))
  assert float(jnp.max(jnp.abs(gelu(x, approximate=True) - gelu(x)))) > 1e-4  # they differ

"""llmx.nn.dropout: the 16-bit Threefry mask keeps the rate, is unbiased, independent between
elements and keys, the same sharded or not, and falls back to nnx.Dropout where it must."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmx.nn.dropout import Dropout, keep_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.9])
def test_keep_rate_and_unbiased(rate):
  shape = (301, 257)  # odd sizes: a partial block at the end of every row
  keep, keep_prob = keep_mask(jax.random.key(3), rate, shape)
  assert keep.shape == shape and keep.dtype == jnp.bool_
  assert abs(keep_prob - (1 - rate)) <= 2 ** -17
  # The kept fraction within 5 standard deviations of the binomial.
  n = keep.size
  sigma = np.sqrt(keep_prob * (1 - keep_prob) / n)
  assert abs(float(jnp.mean(keep)) - keep_prob) < 5 * sigma
  x = jnp.ones(shape)
  y = Dropout(rate, rngs=nnx.Rngs(dropout=4))(x, deterministic=False)
  assert abs(float(jnp.mean(y)) - 1.0) < 5 * sigma / keep_prob  # E[y] = x
  kept = np.asarray(y)[np.asarray(y) != 0]
  np.testing.assert_allclose(kept, 1 / keep_prob, rtol=1e-6)


def test_elements_and_keys_independent():
  """The four elements sharing one Threefry block, neighbours in general, and two keys: no
  correlation beyond sampling noise (|r| < 5 / sqrt(n))."""
  keep, _ = keep_mask(jax.random.key(0), 0.5, (2000, 64))
  k = np.asarray(keep, np.float64)
  bound = 5 / np.sqrt(k.size / 2)
  for lag in (1, 2, 3, 4, 64):  # lags 1-3: inside a block; 4: the next block
    flat = k.reshape(-1)
    r = np.corrcoef(flat[:-lag], flat[lag:])[0, 1]
    assert abs(r) < bound, (lag, r)
  other, _ = keep_mask(jax.random.key(1), 0.5, (2000, 64))
  r = np.corrcoef(k.reshape(-1), np.asarray(other, np.float64).reshape(-1))[0, 1]
  assert abs(r) < bound
  assert not np.array_equal(np.asarray(keep), np.asarray(other))


def test_stream_advances_and_modes():
  x = jnp.arange(1.0, 2 * 9 * 11 + 1).reshape(2, 9, 11)
  drop = Dropout(0.3, rngs=nnx.Rngs(dropout=0))
  a, b = drop(x, deterministic=False), drop(x, deterministic=False)
  assert not np.array_equal(a, b)  # each call draws a new key from the stream
  np.testing.assert_array_equal(drop(x, deterministic=True), x)
  drop.eval()
  np.testing.assert_array_equal(drop(x), x)
  drop.train()
  assert not np.array_equal(drop(x), x)
  np.testing.assert_array_equal(Dropout(0.0, rngs=nnx.Rngs(0))(x, deterministic=False), x)
  np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x, deterministic=False), 0 * x)
  with pytest.raises(ValueError, match="rngs"):
    Dropout(0.3)(x, deterministic=False)


def test_broadcast_dims_and_gradient():
  x = jax.random.normal(jax.random.key(5), (3, 17, 10))
  drop = Dropout(0.4, broadcast_dims=(1,), rngs=nnx.Rngs(dropout=1))
  key = jax.random.key(9)
  y = drop(x, deterministic=False, rngs=key)
  kept = np.asarray(y != 0)
  assert np.all(kept == kept[:, :1])  # one mask for every position along axis 1
  keep, keep_prob = keep_mask(key, 0.4, (3, 1, 10))
  np.testing.assert_allclose(y, np.where(keep, x / keep_prob, 0.0), rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(drop(x, deterministic=False, rngs=key)))(x)
  np.testing.assert_allclose(grad, np.broadcast_to(np.where(keep, 1 / keep_prob, 0.0), x.shape),
                             rtol=1e-6)


def test_rates_at_the_edges_of_16_bits():
  """Rates whose 16-bit threshold would be 0 or 2**16 are nnx.Dropout's (no division by a keep
  probability of 0); keep_mask itself refuses them in one line."""
  x = jax.random.normal(jax.random.key(5), (8, 33))
  key = jax.random.key(4)
  for rate in (1e-6, 1 - 1e-6):
    ours = Dropout(rate, rngs=nnx.Rngs(0))(x, deterministic=False, rngs=key)
    theirs = nnx.Dropout(rate, rngs=nnx.Rngs(0))(x, deterministic=False, rngs=key)
    np.testing.assert_array_equal(ours, theirs)
    assert np.all(np.isfinite(np.asarray(ours)))
    with pytest.raises(ValueError, match=r"rate=.*2\*\*-17"):
      keep_mask(key, rate, (8, 33))


def test_other_prng_falls_back_to_nnx():
  x = jax.random.normal(jax.random.key(5), (8, 33))
  key = jax.random.key(2, impl="rbg")
  ours = Dropout(0.25, rngs=nnx.Rngs(0))(x, deterministic=False, rngs=key)
  theirs = nnx.Dropout(0.25, rngs=nnx.Rngs(0))(x, deterministic=False, rngs=key)
  np.testing.assert_array_equal(ours, theirs)
  raw = jax.random.PRNGKey(2)  # a raw uint32[2] Threefry key is served, as its typed twin
  np.testing.assert_array_equal(keep_mask(raw, 0.25, (8, 33))[0],
                                keep_mask(jax.random.wrap_key_data(raw), 0.25, (8, 33))[0])


def test_sharded_mask_is_the_unsharded_mask():
  """On a 4-device mesh (a child process: pytest's has one CPU device), a mask drawn for
  activations sharded over rows, or over columns, is the one drawn unsharded."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-m", "tests.test_dropout"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "sharded == unsharded: rows, columns"


def _child_sharded():
  assert jax.device_count() == 4, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  x = jax.random.normal(jax.random.key(0), (64, 97))
  drop = Dropout(0.2, rngs=nnx.Rngs(0))
  key = jax.random.key(7)
  apply = jax.jit(lambda x: drop(x, deterministic=False, rngs=key))
  want = np.asarray(apply(x))
  checked = []
  for name, spec, shape in (("rows", P("data"), (64, 97)), ("columns", P(None, "data"), (64, 96))):
    sharding = NamedSharding(mesh, spec)
    sharded = jax.jit(lambda x: drop(x, deterministic=False, rngs=key), out_shardings=sharding)
    got = sharded(jax.device_put(x[:, :shape[1]], sharding))
    assert got.sharding == sharding
    want_here = want if shape[1] == 97 else np.asarray(apply(x[:, :96]))
    np.testing.assert_array_equal(np.asarray(got), want_here)
    checked.append(name)
  print("sharded == unsharded:", ", ".join(checked))


if __name__ == "__main__":
  _child_sharded()

"""The supervised losses of llmx/train/losses.py against float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx.train import losses

RTOL, ATOL = 1e-5, 1e-6  # float32 against float64


def _np_log_softmax(z):
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def _np_cross_entropy(z, labels, *, s=0.0, c=0.0, ignore=losses.IGNORE_INDEX):
  """Per position: -sum_k q_k log p_k with q = (1 - s) onehot + s / C, plus c * lse^2; 0 if ignored."""
  z = z.astype(np.float64)
  classes = z.shape[-1]
  logp = _np_log_softmax(z)
  valid = labels != ignore
  q = np.full(z.shape, s / classes)
  onehot = np.eye(classes)[np.where(valid, labels, 0)]
  q += (1 - s) * onehot
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  loss = -(q * logp).sum(-1) + c * lse**2
  return np.where(valid, loss, 0.0)


def test_mse():
  rng = np.random.default_rng(0)
  p, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  want = (p - t) ** 2
  got = losses.mse(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32), reduction="none")
  assert got.shape == (4, 3)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses.mse(p.astype(np.float32), t.astype(np.float32)), want.mean(),
                             rtol=RTOL)
  np.testing.assert_allclose(losses.mse(p.astype(np.float32), t.astype(np.float32),
                                        reduction="sum"), want.sum(), rtol=RTOL)


def test_binary_cross_entropy_matches_the_definition_and_stays_finite():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(scale=3, size=20), [-80.0, 80.0, 0.0]])
  y = np.concatenate([rng.integers(0, 2, 20), [1, 0, 1]]).astype(np.float64)
  # -y log s(x) - (1 - y) log(1 - s(x)), written with log1p for the extreme logits.
  want = y * np.log1p(np.exp(-x)) + (1 - y) * np.log1p(np.exp(x))
  sig = 1 / (1 + np.exp(-x[:20]))
  assert np.allclose(want[:20], -(y[:20] * np.log(sig) + (1 - y[:20]) * np.log(1 - sig)))
  got = losses.binary_cross_entropy(x.astype(np.float32), y.astype(np.float32), reduction="none")
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(losses.binary_cross_entropy(x.astype(np.float32), y), want.mean(),
                             rtol=RTOL)
  # Soft labels (probabilities) are allowed: the loss is least at x = logit(y).
  grad = jax.grad(lambda x: losses.binary_cross_entropy(x, jnp.array([0.25])))(jnp.array([np.log(1 / 3)]))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize("s,c", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_cross_entropy_with_smoothing_z_loss_and_ignored_positions(s, c):
  rng = np.random.default_rng(2)
  z = rng.normal(scale=4, size=(3, 5, 7))
  labels = rng.integers(0, 7, (3, 5))
  labels[0, :2] = labels[2, 4] = losses.IGNORE_INDEX
  want = _np_cross_entropy(z, labels, s=s, c=c)
  z32 = z.astype(np.float32)
  got = losses.cross_entropy(z32, labels, label_smoothing=s, z_loss=c, reduction="none")
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
  valid = labels != losses.IGNORE_INDEX
  np.testing.assert_allclose(losses.cross_entropy(z32, labels, label_smoothing=s, z_loss=c),
                             want.sum() / valid.sum(), rtol=RTOL)
  np.testing.assert_allclose(losses.cross_entropy(z32, labels, label_smoothing=s, z_loss=c,
                                                  reduction="sum"), want.sum(), rtol=RTOL)
  # Ignored positions get no gradient.
  grad = jax.grad(lambda z: losses.cross_entropy(z, labels, label_smoothing=s, z_loss=c))(z32)
  assert not np.asarray(grad)[~valid].any() and np.asarray(grad)[valid].any()


def test_cross_entropy_gradient_is_softmax_minus_target():
  rng = np.random.default_rng(3)
  z, labels, s = rng.normal(size=(6, 4)), rng.integers(0, 4, 6), 0.1
  p = np.exp(_np_log_softmax(z))
  target = (1 - s) * np.eye(4)[labels] + s / 4
  grad = jax.grad(lambda z: losses.cross_entropy(z, labels, label_smoothing=s))(z.astype(np.float32))
  np.testing.assert_allclose(grad, (p - target) / 6, rtol=1e-4, atol=1e-6)


def test_cross_entropy_edge_cases():
  z = np.zeros((2, 3), np.float32)
  all_ignored = np.full(2, losses.IGNORE_INDEX)
  assert float(losses.cross_entropy(z, all_ignored)) == 0.0
  assert np.isnan(losses.cross_entropy(z, np.array([0, 3])))  # 3 is not a class of 3
  np.testing.assert_allclose(losses.cross_entropy(z, np.array([0, 2])), np.log(3), rtol=RTOL)
  # A custom ignore index, and bfloat16 logits computed in float32.
  np.testing.assert_allclose(losses.cross_entropy(z.astype(jnp.bfloat16), np.array([0, 7]),
                                                  ignore_index=7), np.log(3), rtol=RTOL)
  assert losses.cross_entropy(z.astype(jnp.bfloat16), np.array([0, 1])).dtype == jnp.float32
  with pytest.raises(ValueError, match="reduction='avg'"):
    losses.mse(z, z, reduction="avg")


def test_one_ignore_index_everywhere():
  """The data floor may not import llmx.train, so its label files carry their own copy of -100;
  they and the fused kernel's default must agree with losses.IGNORE_INDEX."""
  import inspect

  import llmx_kernels as kernels
  from llmx.data import bert_pretraining, packing, tsv
  kernel_default = inspect.signature(kernels.linear_cross_entropy).parameters["ignore_index"].default
  assert {tsv.IGNORE_INDEX, bert_pretraining.IGNORE_INDEX, packing.IGNORE,
          kernel_default} == {losses.IGNORE_INDEX}

"""GANs: the losses by hand, the gradient penalty by finite differences, the two-optimizer step,
the mode-collapse metric, resume, the DCGAN's shapes and the errors a user can hit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmx.families.gan import data, evaluate, model as gan_lib, recipe
from llmx.families.gan.step import adversarial
from llmx.train import loop, losses, optimizers
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config


def fast_rngs(seed=0):
  """Parameter RNGs on the "rbg" key type: on XLA:CPU its initialisers compile ~5x faster than
  threefry's (a DCGAN pair: ~2 s of CPU instead of ~10 s), and these tests need no particular
  random stream."""
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def grads(fn, *args):
  return [np.asarray(g) for g in jax.grad(fn, argnums=tuple(range(len(args))))(*map(jnp.asarray, args))]


# ------------------------------------------------------------------------------------- losses

def test_losses_at_hand_checkable_logits():
  zero = jnp.zeros(3)
  log2 = np.log(2.0)
  for name in ("minimax", "non_saturating"):  # D(x) = 1/2 everywhere: -log 1/2 - log 1/2
    np.testing.assert_allclose(losses.discriminator_loss(name, zero, zero), 2 * log2, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss("minimax", zero), -log2, rtol=1e-6)  # log(1 - 1/2)
  np.testing.assert_allclose(losses.generator_loss("non_saturating", zero), log2, rtol=1e-6)
  # hinge: relu(1 - [2, 0.5]) = [0, 0.5]; relu(1 + [-2, 0.5]) = [0, 1.5]
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
  np.testing.assert_allclose(losses.discriminator_loss("hinge", real, fake), 0.25 + 0.75)
  np.testing.assert_allclose(losses.generator_loss("hinge", fake), 0.75)
  np.testing.assert_allclose(losses.discriminator_loss("wgan_gp", real, fake), -0.75 - 1.25)
  np.testing.assert_allclose(losses.generator_loss("wgan_gp", fake), 0.75)


def test_losses_match_their_formulas_at_random_logits():
  rng = np.random.default_rng(7)
  r, f = rng.normal(0, 3, 13), rng.normal(0, 3, 11)
  sig = lambda x: 1 / (1 + np.exp(-x))
  bce = -np.mean(np.log(sig(r))) - np.mean(np.log(1 - sig(f)))
  expected_d = dict(minimax=bce, non_saturating=bce,
                    hinge=np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)),
                    wgan_gp=f.mean() - r.mean())
  expected_g = dict(minimax=np.mean(np.log(1 - sig(f))), non_saturating=-np.mean(np.log(sig(f))),
                    hinge=-f.mean(), wgan_gp=-f.mean())
  for name in losses.GAN_LOSSES:
    np.testing.assert_allclose(losses.discriminator_loss(name, r, f), expected_d[name], rtol=1e-5)
    np.testing.assert_allclose(losses.generator_loss(name, f), expected_g[name], rtol=1e-5)


@pytest.mark.parametrize("name", losses.GAN_LOSSES)
def test_gradient_signs(name):
  """Descending the discriminator loss raises real logits and lowers fake ones; descending the
  generator loss raises the fake logits."""
  r, f = np.array([-0.3, 0.4, 0.2]), np.array([0.1, -0.6, 0.5])  # inside the hinge margins
  g_r, g_f = grads(lambda r, f: losses.discriminator_loss(name, r, f), r, f)
  assert (g_r < 0).all() and (g_f > 0).all()
  (g_gen,) = grads(lambda f: losses.generator_loss(name, f), f)
  assert (g_gen < 0).all()


def test_minimax_generator_saturates_and_non_saturating_does_not():
  """While D rejects the fakes (logit -10), log(1 - D) has almost no gradient; -log D has ~1."""
  f = np.full(4, -10.0)
  (minimax,) = grads(lambda f: losses.generator_loss("minimax", f), f)
  (ns,) = grads(lambda f: losses.generator_loss("non_saturating", f), f)
  np.testing.assert_allclose(minimax, -jax.nn.sigmoid(-10.0) / 4, rtol=1e-4)  # ~ -1e-5
  np.testing.assert_allclose(ns, -jax.nn.sigmoid(10.0) / 4, rtol=1e-4)        # ~ -0.25
  # Large logits stay finite (softplus form, no log(0)).
  assert np.isfinite(losses.discriminator_loss("minimax", jnp.array([-200.0]), jnp.array([200.0])))


def test_gradient_penalty_of_a_linear_critic():
  w = jnp.array([0.6, 0.8, 1.2])  # |w| = sqrt(2.44); gradient w everywhere
  x = jax.random.normal(jax.random.key(0), (5, 3))
  gp = losses.gradient_penalty(lambda x: x @ w, x, -x, jnp.linspace(0, 1, 5))
  np.testing.assert_allclose(gp, (np.sqrt(2.44) - 1) ** 2, rtol=1e-5)


def test_gradient_penalty_against_finite_differences():
  k = jax.random.split(jax.random.key(3), 5)
  w1, w2 = jax.random.normal(k[0], (3, 7)), jax.random.normal(k[1], (7,)) * 0.5
  critic = lambda x, w1=w1: jnp.tanh(jnp.tanh(x @ w1) @ w2 * 2.0)  # smooth: FD is accurate
  real, fake = jax.random.normal(k[2], (6, 3)), jax.random.normal(k[3], (6, 3)) + 1.0
  alpha = jax.random.uniform(k[4], (6,))
  gp = float(losses.gradient_penalty(critic, real, fake, alpha))
  # Central differences of each sample's critic output at x_hat, in float64 numpy.
  x_hat = np.asarray(alpha[:, None] * real + (1 - alpha[:, None]) * fake, np.float64)
  w1n, w2n = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
  f = lambda x: np.tanh(np.tanh(x @ w1n) @ w2n * 2.0)
  eps, fd = 1e-6, np.zeros_like(x_hat)
  for j in range(3):
    step = np.zeros(3)
    step[j] = eps
    fd[:, j] = (f(x_hat + step) - f(x_hat - step)) / (2 * eps)
  expected = np.mean((np.linalg.norm(fd, axis=1) - 1) ** 2)
  np.testing.assert_allclose(gp, expected, rtol=1e-4)
  # Its gradient with respect to the critic's weights (what the discriminator step descends),
  # against finite differences of the penalty itself.
  pen = jax.jit(lambda w1: losses.gradient_penalty(lambda x: critic(x, w1), real, fake, alpha))
  g = np.asarray(jax.jit(jax.grad(pen))(w1))
  direction = np.asarray(jax.random.normal(jax.random.key(9), w1.shape))
  h = 1e-2
  fd_dir = (float(pen(w1 + h * direction)) - float(pen(w1 - h * direction))) / (2 * h)
  np.testing.assert_allclose(np.sum(g * direction), fd_dir, rtol=2e-3, atol=1e-5)


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(losses.UnknownLossError, match=r"unknown GAN loss 'lsgan': must be one of 'minimax'"):
    losses.discriminator_loss("lsgan", jnp.zeros(2), jnp.zeros(2))
  with pytest.raises(losses.UnknownLossError, match="'wgan'"):
    losses.generator_loss("wgan", jnp.zeros(2))
  with pytest.raises(losses.UnknownLossError):
    adversarial(small_gan(), optax.sgd(0.1), optax.sgd(0.1), loss="wgan", n_critic=1,
                          batch_size=4)
  with pytest.raises(ValueError, match="wgan_gp loss needs gp_weight > 0"):
    adversarial(small_gan(), optax.sgd(0.1), optax.sgd(0.1), loss="wgan_gp", n_critic=1,
                          batch_size=4, gp_weight=0.0)


# ----------------------------------------------------------------------------- models, step

def small_gan(seed=0, hidden=9, noise_dim=3):
  rngs = nnx.Rngs(params=seed)
  return gan_lib.GAN(gan_lib.MLPGenerator(noise_dim, 2, hidden=hidden, depth=2, rngs=rngs),
                     gan_lib.MLPDiscriminator(2, hidden=hidden, depth=2, rngs=rngs))


def real_data(rows, seed=0):
  return np.random.default_rng(seed).normal(size=(rows, 2)).astype(np.float32) + 1.0


@pytest.mark.parametrize("loss", ["non_saturating", "wgan_gp"])
def test_one_step_updates_each_network_with_its_own_optimizer(loss):
  """Adam's first update moves every parameter by its learning rate (|g| >> eps): so G's params
  move by exactly lr_g and D's by exactly lr_d, and neither optimizer touches the other network."""
  lr_g, lr_d = 1e-3, 3e-2
  trainable = adversarial(small_gan(), optax.adam(lr_g, eps=1e-12),
                                    optax.adam(lr_d, eps=1e-12), loss=loss, n_critic=1,
                                    batch_size=7, gp_weight=10.0 if loss == "wgan_gp" else 0.0)
  before = trainable.init()
  before_g = [np.asarray(x) for x in jax.tree.leaves(before["g_params"])]
  before_d = [np.asarray(x) for x in jax.tree.leaves(before["d_params"])]
  after, metrics = jax.jit(trainable.train_step)(before, real_data(7))
  for name, old, params in (("g", before_g, after["g_params"]), ("d", before_d, after["d_params"])):
    lr = lr_g if name == "g" else lr_d
    moved = np.concatenate([np.abs(np.asarray(b) - a).ravel()
                            for a, b in zip(old, jax.tree.leaves(params), strict=True)])
    assert (moved > 0).mean() > 0.75, name  # a few units of the tiny nets are dead ReLUs
    np.testing.assert_allclose(moved[moved > 0], lr, rtol=1e-3, err_msg=name)
  assert int(after["step"]) == 1 and int(after["nonfinite_step"]) == -1
  assert {"d_loss", "g_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm"} <= set(metrics)
  assert ("gradient_penalty" in metrics) == (loss == "wgan_gp")


def test_n_critic_discriminator_updates_per_generator_update():
  trainable = adversarial(small_gan(), optax.adam(1e-3), optax.adam(1e-3), loss="hinge",
                                    n_critic=3, batch_size=5)
  state, _ = jax.jit(trainable.train_step)(trainable.init(), real_data(15))
  counts = lambda opt_state: {int(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0}
  assert counts(state["g_opt_state"]) == {1} and counts(state["d_opt_state"]) == {3}


def test_generator_step_raises_the_discriminator_score_of_its_samples():
  """A few steps with a frozen discriminator (lr 0): G's own noise scores higher."""
  gan = small_gan(seed=1)
  trainable = adversarial(gan, optax.sgd(0.05), optax.sgd(0.0), loss="non_saturating",
                                    n_critic=1, batch_size=64)
  state = trainable.init()
  score = lambda s: float(jnp.mean(trainable.model_of(s).discriminator(
      trainable.model_of(s).sample(jax.random.key(5), 512))))
  first = score(state)
  step = jax.jit(trainable.train_step)
  for i in range(20):
    state, _ = step(state, real_data(64, seed=i))
  assert score(state) > first + 0.01


@pytest.mark.parametrize("image_size", [8, 16])
def test_dcgan_shapes_and_range(image_size):
  rngs = fast_rngs()
  g = gan_lib.DCGANGenerator(5, image_size, 1, width=4, rngs=rngs)
  d = gan_lib.DCGANDiscriminator(image_size, 1, width=4, rngs=rngs)
  # Jitted: op-by-op, the convolutions and batch norms cost ~8 s of CPU per size.
  x, logits = nnx.jit(lambda g, d, z: (g(z), d(g(z))))(g, d, jax.random.normal(jax.random.key(0), (3, 5)))
  assert x.shape == (3, image_size, image_size, 1) and float(jnp.abs(x).max()) <= 1.0
  assert logits.shape == (3,)


@pytest.mark.parametrize("size", [4, 12, 28, 0, -8, 7.5, True])
def test_dcgan_rejects_sizes_it_cannot_produce(size):
  with pytest.raises(gan_lib.ImageSizeError, match=rf"image size {size!r} cannot be produced.*8, 16, 32"):
    gan_lib.DCGANGenerator(5, size, 1, width=4, rngs=fast_rngs())
  with pytest.raises(gan_lib.ImageSizeError):
    gan_lib.DCGANDiscriminator(size, 1, width=4, rngs=fast_rngs())


def test_depth_to_space_places_channel_blocks_as_pixels():
  x = jnp.arange(2 * 3 * 5 * 4 * 7).reshape(2, 3, 5, 4 * 7)
  y = gan_lib.depth_to_space(x)
  assert y.shape == (2, 6, 10, 7)
  for i in range(2):
    for j in range(2):
      np.testing.assert_array_equal(y[:, i::2, j::2], x[..., (2 * i + j) * 7:(2 * i + j + 1) * 7])


def test_sub_pixel_upsampling_expresses_a_transposed_convolution():
  """Least squares finds 3x3-conv weights whose depth-to-space output equals a random 4x4
  stride-2 transposed convolution (DCGAN's layer) exactly: same function class."""
  rngs = fast_rngs()
  conv_t = nnx.ConvTranspose(2, 3, (4, 4), strides=(2, 2), padding="SAME", use_bias=False, rngs=rngs)
  x = jax.random.normal(jax.random.key(1), (6, 4, 4, 2))
  target = nnx.jit(lambda m, x: m(x))(conv_t, x)
  sub_pixel = lambda w: gan_lib.depth_to_space(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  w0 = jnp.zeros((3, 3, 2, 12))
  jac = jax.jit(jax.jacobian(sub_pixel))(w0).reshape(target.size, -1)  # the map is linear in w
  w, *_ = np.linalg.lstsq(np.asarray(jac, np.float64), np.asarray(target, np.float64).ravel(), rcond=None)
  np.testing.assert_allclose(jax.jit(sub_pixel)(jnp.asarray(w, jnp.float32).reshape(w0.shape)),
                             target, atol=1e-5)


def test_dcgan_discriminator_rejects_other_image_shapes():
  d = gan_lib.DCGANDiscriminator(8, 1, width=4, rngs=fast_rngs())
  with pytest.raises(gan_lib.ImageSizeError, match=r"images of shape \(16, 16, 1\).*\(8, 8, 1\)"):
    d(jnp.zeros((2, 16, 16, 1)))


def test_resume_gives_the_uninterrupted_run_with_batch_norm(tmp_path):
  """Both params, both Adam states and the generator's batch statistics go through orbax: a run
  stopped at step 3 and resumed equals the uninterrupted one bit for bit."""
  c = load_config("gan.py:smoke")
  c.train.update(steps=6, batch_size=8)
  c.gan.update(n_critic=2, loss="hinge", gp_weight=0.5)

  def train(workdir, steps):
    rngs = fast_rngs()
    gan = gan_lib.GAN(gan_lib.MLPGenerator(3, 2, hidden=8, depth=2, batch_norm=True, rngs=rngs),
                      gan_lib.MLPDiscriminator(2, hidden=8, depth=2, rngs=rngs))
    g_tx, _ = optimizers.from_config(c.train)
    d_tx, _ = optimizers.from_config(c.train, steps=c.train.steps * c.gan.n_critic,
                                     learning_rate=c.train.d_learning_rate)
    trainable = adversarial(gan, g_tx, d_tx, loss="hinge", n_critic=2, batch_size=8,
                                      gp_weight=0.5, seed=0)
    return loop.train(trainable, train_batches=data.real_batches(c, seed=0),
                      eval_batches=[], workdir=str(workdir), meta=dict(must_match={}),
                      options=loop.LoopOptions(steps=steps, checkpoint_every=3, log_every=3))

  full = train(tmp_path / "full", 6)
  train(tmp_path / "split", 3)
  resumed = train(tmp_path / "split", 6)
  assert resumed.step == 6 and jax.tree.leaves(full.state["g_rest"])  # batch statistics present
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- data, metrics

def test_real_batches_are_a_function_of_seed_and_step():
  c = load_config("gan.py:ring")
  c.train.batch_size, c.gan.n_critic = 6, 2
  ds = data.real_batches(c, seed=3)
  assert ds[5].shape == (12, 2) and ds[5].dtype == np.float32
  np.testing.assert_array_equal(ds[5], data.real_batches(c, seed=3)[5])
  assert not np.array_equal(ds[5], ds[6])
  halves = [data.real_batches(c, seed=3, process_index=p, process_count=2)[5] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), ds[5])
  radius = np.linalg.norm(np.concatenate([ds[i] for i in range(20)]), axis=1)
  assert np.abs(radius - 2).max() < 6 * 0.02  # 8 Gaussians on the circle of radius 2, std 0.02


def test_mode_collapse_metric():
  centres, std = data.mode_centres("grid")
  assert centres.shape == (25, 2) and std == 0.05
  rng = np.random.default_rng(0)
  # 21 samples at each of 24 modes, 20 at the last, plus 55 far from any mode (1 unit off-grid).
  on = np.concatenate([np.repeat(centres[:24], 21, 0), np.repeat(centres[24:], 20, 0)])
  on = on + rng.normal(0, std, on.shape).clip(-1, 1) * 0.5  # within 3 std
  off = np.full((55, 2), 1.0)
  m = evaluate.mode_collapse_metrics(np.concatenate([on, off]), centres, std)
  assert m["modes_captured"] == 25 and m["high_quality_fraction"] == pytest.approx(524 / 579)
  m = evaluate.mode_collapse_metrics(np.concatenate([on[:-1], off]), centres, std)
  assert m["modes_captured"] == 24  # 19 high-quality samples do not capture a mode
  m = evaluate.mode_collapse_metrics(centres[:3] + 3.01 * std, centres, std)  # diagonal: > 3 std
  assert m["modes_captured"] == 0 and m["high_quality_fraction"] == 0


def test_digit_classifier_reads_real_digits_as_uniform():
  images, labels = data.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.min() == -1 and images.max() == 1
  clf = evaluate.DigitClassifier(images, labels)
  assert clf.test_accuracy > 0.93
  m = clf.metrics(images)
  assert m["classes_covered"] == 10 and m["class_entropy"] > np.log(10) - 0.01
  assert m["classifier_confidence"] > 0.9 and m["accuracy_weighted_confidence"] > 0.85
  collapsed = clf.metrics(np.repeat(images[labels == 3][:50], 10, 0))
  assert collapsed["classes_covered"] <= 2 and collapsed["class_entropy"] < 0.5
  assert data.load_digits(16)[0].shape == (1797, 16, 16, 1)


# --------------------------------------------------------------------------- config, command

@pytest.mark.parametrize("overrides, message", [
    (dict(gan=dict(loss="lsgan")), r"gan.loss='lsgan': unknown GAN loss, must be one of 'minimax'"),
    (dict(data=dict(name="moons")), r"data.name='moons': must be one of 'ring', 'grid', 'digits'"),
    (dict(data=dict(name="digits", image_size=12)), r"data.image_size=12: image size 12 cannot be produced"),
    (dict(gan=dict(n_critic=0)), r"gan.n_critic=0: must be an integer > 0"),
    (dict(train=dict(beta1=1.0)), r"train.beta1=1.0: must lie in \[0.0, 1.0\)"),
    (dict(train=dict(schedule="cosine")), r"train.schedule='cosine'"),
    (dict(gan=dict(loss="wgan_gp", gp_weight=0.0)), r"gan.gp_weight=0.0: the wgan_gp loss needs"),
])
def test_config_validation(overrides, message):
  c = load_config("gan.py:smoke")
  for section, values in overrides.items():
    c[section].update(values)
  with pytest.raises(ConfigError, match=message):
    recipe.validate(c)


def test_unknown_variant():
  with pytest.raises(ConfigError, match=r"unknown variant 'moons' of gan.py: use one of 'grid', 'ring'"):
    load_config("gan.py:moons")
  for variant in ("grid", "ring", "digits", "smoke"):
    recipe.validate(load_config(f"gan.py:{variant}"))


def test_command_line_run_writes_metrics_and_figures(tmp_path):
  proc = cli("experiments.train_gan", "--config=experiments/configs/gan.py:smoke",
             f"--workdir={tmp_path}")
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [5, 10, 15, 20]
  assert {"modes_captured", "high_quality_fraction", "val_d_loss", "g_loss"} <= set(lines[1])
  assert (tmp_path / "samples_20.png").stat().st_size > 1000
  assert "--- grid wgan_gp seed 0: step 20" in proc.stdout
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


def test_command_line_errors_are_one_line(tmp_path):
  proc = cli("experiments.train_gan", "--config=experiments/configs/gan.py:digits",
             f"--workdir={tmp_path}", "--config.data.image_size=12", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error: data.image_size=12: image size 12 cannot be produced by the DCGAN" in proc.stderr

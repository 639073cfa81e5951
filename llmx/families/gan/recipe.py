"""The one place a GAN config becomes modules: validation, data, models, optimizers, the
adversarial training step, and the evaluation (mode-collapse protocol, digit classifier)."""
import math

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llmx.train import losses
from llmx.families.gan import model as gan_lib
from llmx.train.config_check import ConfigError, require_choice, require_positive, require_range
from llmx.train.step import Trainable, track_nonfinite

DATASETS = ("ring", "grid", "digits")


# ----------------------------------------------------------------------------------------- data

def mode_centres(name: str) -> tuple[np.ndarray, float]:
  """-> (centres [K, 2], std) of the 2-D mixtures of the mode-collapse literature (VEEGAN, PacGAN)."""
  if name == "ring":  # 8 Gaussians on a circle of radius 2
    angles = 2 * np.pi * np.arange(8) / 8
    return np.stack([2 * np.cos(angles), 2 * np.sin(angles)], 1).astype(np.float32), 0.02
  if name == "grid":  # 25 Gaussians at {-4, -2, 0, 2, 4}^2
    xs = np.arange(-4, 5, 2, dtype=np.float32)
    return np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2), 0.05
  raise ConfigError(f"data.name={name!r} is not a 2-D mixture: must be 'ring' or 'grid'")


def load_digits(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits (1,797 images, no download) -> (images float32
  [n, image_size, image_size, 1] in [-1, 1], labels int [n]); resized bilinearly if not 8."""
  from sklearn.datasets import load_digits as sk_load_digits
  digits = sk_load_digits()
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # pixel values are 0..16
  if image_size != 8:
    images = np.asarray(jax.image.resize(images, (len(images), image_size, image_size, 1), "bilinear"))
  return images, digits.target


def real_batches(c: ml_collections.ConfigDict, *, seed: int, process_index: int = 0,
                 process_count: int = 1, digit_images: np.ndarray | None = None) -> grain.MapDataset:
  """Item `step` is this process's rows of the real data for generator step `step`:
  float32 [n_critic * batch_size, *data_shape], one batch per discriminator step, computed from
  (seed, step) alone (mixtures: sampled afresh; digits: drawn with replacement)."""
  rows = c.gan.n_critic * c.train.batch_size
  if rows % process_count:
    raise ConfigError(f"gan.n_critic * train.batch_size = {rows} is not divisible by "
                      f"{process_count} processes")
  local = rows // process_count
  if c.data.name == "digits":
    def draw(rng):
      return digit_images[rng.integers(0, len(digit_images), rows)]
  else:
    centres, std = mode_centres(c.data.name)
    def draw(rng):
      x = centres[rng.integers(0, len(centres), rows)]
      return (x + std * rng.standard_normal(x.shape)).astype(np.float32)

  def batch(step):
    x = draw(np.random.default_rng((seed, int(step))))
    return x[process_index * local:(process_index + 1) * local]

  return grain.MapDataset.range(2**40 // rows).map(batch)


# ------------------------------------------------------------------------------ config, models

def validate(c: ml_collections.ConfigDict):
  """Checks every field before anything is built or compiled."""
  require_choice(c, "data.name", DATASETS)
  if c.gan.loss not in losses.GAN_LOSSES:
    raise ConfigError(f"gan.loss={c.gan.loss!r}: unknown GAN loss, must be one of "
                      f"{', '.join(map(repr, losses.GAN_LOSSES))}")
  require_positive(c, "train.steps", "train.batch_size", "train.log_every", "gan.n_critic",
                   "model.noise_dim", "model.hidden", "model.depth", "model.width",
                   "eval.num_samples")
  require_positive(c, "train.eval_every", "train.checkpoint_every", "train.seed",
                   allow_zero=True)
  for field in ("train.learning_rate", "train.d_learning_rate"):
    require_range(c, field, 0.0, float("inf"), low_open=True)
  for field in ("train.beta1", "train.beta2"):
    require_range(c, field, 0.0, 1.0)
  require_range(c, "gan.gp_weight", 0.0, float("inf"))
  if c.gan.loss == "wgan_gp" and c.gan.gp_weight <= 0:
    raise ConfigError(f"gan.gp_weight={c.gan.gp_weight!r}: the wgan_gp loss needs a penalty > 0 "
                      f"(without it the critic is unbounded)")
  require_choice(c, "train.lr_decay", ("constant", "linear"))
  if c.data.name == "digits":
    try:
      gan_lib.dcgan_upsamplings(c.data.image_size)
    except gan_lib.ImageSizeError as e:
      raise ConfigError(f"data.image_size={c.data.image_size!r}: {e}") from None


def build_gan(c: ml_collections.ConfigDict) -> gan_lib.GAN:
  """MLP pair for the 2-D mixtures, DCGAN pair for digits; initialised from train.seed."""
  m, rngs = c.model, nnx.Rngs(params=c.train.seed)
  if c.data.name == "digits":
    return gan_lib.GAN(
        gan_lib.DCGANGenerator(m.noise_dim, c.data.image_size, 1, width=m.width, rngs=rngs),
        gan_lib.DCGANDiscriminator(c.data.image_size, 1, width=m.width, rngs=rngs))
  centres, _ = mode_centres(c.data.name)
  scale = float(np.sqrt(np.mean(np.square(centres))))  # per-coordinate RMS: grid 2.83, ring 1.41
  return gan_lib.GAN(
      gan_lib.MLPGenerator(m.noise_dim, 2, hidden=m.hidden, depth=m.depth, data_scale=scale,
                           rngs=rngs),
      gan_lib.MLPDiscriminator(2, hidden=m.hidden, depth=m.depth, data_scale=scale, rngs=rngs))


def build_optimizers(c: ml_collections.ConfigDict):
  """-> (generator tx, discriminator tx): Adam each, constant or decaying linearly to 0 by the
  end of the run (the discriminator's schedule counts its n_critic updates per step)."""
  t = c.train

  def adam(lr, updates):
    schedule = optax.linear_schedule(lr, 0.0, updates) if t.lr_decay == "linear" else lr
    return optax.adam(schedule, b1=t.beta1, b2=t.beta2)

  return adam(t.learning_rate, t.steps), adam(t.d_learning_rate, t.steps * c.gan.n_critic)


# ------------------------------------------------------------------------- the training step

def adversarial(gan: gan_lib.GAN, g_tx: optax.GradientTransformation,
                d_tx: optax.GradientTransformation, *, loss: str, n_critic: int, batch_size: int,
                gp_weight: float = 0.0, seed: int = 0) -> Trainable:
  """The Trainable of a GAN: each step makes `n_critic` discriminator updates with `d_tx`, then one
  generator update with `g_tx` against the updated discriminator, in one jit-compiled function.

  State: {g_params, g_rest (batch statistics), g_opt_state, d_params, d_opt_state, step,
  nonfinite_step}. A batch is the real data of the step, [n_critic * batch_size, *data_shape].
  The noise of step s comes from fold_in(key(seed), s), so a resumed run draws the same noise.
  """
  losses.check_gan_loss(loss)
  if loss == "wgan_gp" and gp_weight <= 0:
    raise ValueError("the wgan_gp loss needs gp_weight > 0: without the penalty the critic is unbounded")
  use_gp = gp_weight > 0  # any loss may take the penalty (Fedus et al. 2018); WGAN-GP must
  g_graphdef, g_params, g_rest = nnx.split(gan.generator, nnx.Param, ...)
  d_graphdef, d_params, d_rest = nnx.split(gan.discriminator, nnx.Param, ...)
  if jax.tree.leaves(d_rest):
    raise ValueError("the discriminator must hold parameters only (no batch statistics or RNG "
                     "streams): the gradient penalty needs per-sample outputs")
  gan.eval()
  g_eval_graphdef, d_eval_graphdef = nnx.split(gan.generator)[0], nnx.split(gan.discriminator)[0]
  gan.train()
  noise_dim = gan.generator.noise_dim
  base_key, eval_key = jax.random.split(jax.random.key(seed))

  def init():
    return dict(g_params=g_params, g_rest=g_rest, g_opt_state=g_tx.init(g_params),
                d_params=d_params, d_opt_state=d_tx.init(d_params),
                step=jnp.zeros((), jnp.int32), nonfinite_step=jnp.full((), -1, jnp.int32))

  def generate(params, rest, key):
    # copy=True: fresh Variables at this trace level, so batch norm may update its statistics.
    g = nnx.merge(g_graphdef, params, rest, copy=True)
    x = g(jax.random.normal(key, (batch_size, noise_dim), jnp.float32))
    return x, nnx.state(g, nnx.Not(nnx.Param))

  def critic(params, graphdef=d_graphdef):
    return nnx.merge(graphdef, params, d_rest, copy=True)

  def d_loss_of(params, real, fake, alpha):
    d = critic(params)
    real_logits, fake_logits = d(real), d(fake)
    d_loss = losses.discriminator_loss(loss, real_logits, fake_logits)
    gp = losses.gradient_penalty(d, real, fake, alpha) if use_gp else jnp.zeros(())
    return d_loss + gp_weight * gp, dict(d_loss=d_loss, gradient_penalty=gp,
                                         d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits))

  def train_step(state, batch):
    real = batch.reshape((n_critic, batch_size) + batch.shape[1:])
    keys = jax.random.split(jax.random.fold_in(base_key, state["step"]), n_critic + 1)

    def critic_step(carry, inputs):
      params, opt_state, g_rest = carry
      real_i, key = inputs
      z_key, alpha_key = jax.random.split(key)
      fake, g_rest = generate(state["g_params"], g_rest, z_key)
      alpha = jax.random.uniform(alpha_key, (batch_size,))
      (total, aux), grads = jax.value_and_grad(d_loss_of, has_aux=True)(
          params, real_i, jax.lax.stop_gradient(fake), alpha)
      updates, opt_state = d_tx.update(grads, opt_state, params)
      aux = dict(aux, d_total=total, d_grad_norm=optax.tree.norm(grads))
      return (optax.apply_updates(params, updates), opt_state, g_rest), aux

    (new_d_params, d_opt_state, g_rest), d_aux = jax.lax.scan(
        critic_step, (state["d_params"], state["d_opt_state"], state["g_rest"]), (real, keys[:-1]))

    def g_loss_of(params):
      fake, rest = generate(params, g_rest, keys[-1])
      return losses.generator_loss(loss, critic(new_d_params)(fake)), rest

    (g_loss, g_rest), g_grads = jax.value_and_grad(g_loss_of, has_aux=True)(state["g_params"])
    updates, g_opt_state = g_tx.update(g_grads, state["g_opt_state"], state["g_params"])
    d_total = jnp.mean(d_aux.pop("d_total"))
    metrics = {k: jnp.mean(v) for k, v in d_aux.items() if use_gp or k != "gradient_penalty"}
    metrics.update(g_loss=g_loss, g_grad_norm=optax.tree.norm(g_grads))
    new_state = dict(g_params=optax.apply_updates(state["g_params"], updates), g_rest=g_rest,
                     g_opt_state=g_opt_state, d_params=new_d_params, d_opt_state=d_opt_state,
                     step=state["step"] + 1,
                     nonfinite_step=track_nonfinite(state, d_total + g_loss))
    return new_state, metrics

  def eval_step(state, batch):
    """Both losses on a fixed real batch and fixed noise, with the models in eval mode."""
    model = model_of(state)
    real = batch[:batch_size]
    real_logits = model.discriminator(real)
    fake_logits = model.discriminator(model.sample(eval_key, len(real)))
    return dict(d_loss=losses.discriminator_loss(loss, real_logits, fake_logits),
                g_loss=losses.generator_loss(loss, fake_logits))

  def model_of(state):
    return gan_lib.GAN(nnx.merge(g_eval_graphdef, state["g_params"], state["g_rest"]),
                       nnx.merge(d_eval_graphdef, state["d_params"], d_rest))

  return Trainable(init=init, train_step=train_step, eval_step=eval_step, model_of=model_of)


# ---------------------------------------------------------------------------------- evaluation

def mode_collapse_metrics(samples: np.ndarray, centres: np.ndarray, std: float, *,
                          quality_stds: float = 3.0, min_count: int = 20) -> dict:
  """The VEEGAN/PacGAN protocol: a sample is high quality within `quality_stds` std of its nearest
  centre; a mode is captured when at least `min_count` high-quality samples are nearest to it.
  samples [n, 2], centres [K, 2] -> {modes_captured, high_quality_fraction, mode_counts [K]}."""
  dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1)
  nearest = dist.argmin(1)
  high_quality = dist[np.arange(len(samples)), nearest] <= quality_stds * std
  counts = np.bincount(nearest[high_quality], minlength=len(centres))
  return dict(modes_captured=int((counts >= min_count).sum()),
              high_quality_fraction=float(high_quality.mean()), mode_counts=counts)


class DigitClassifier:
  """Multinomial logistic regression on real digits (held-out accuracy ~0.96): reads the class
  histogram of generated digits and how confidently they look like some digit."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    x = images.reshape(len(images), -1)
    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.25,
                                                        random_state=seed, stratify=labels)
    self._clf = LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train)
    predicted = self._clf.predict(x_test)
    self.test_accuracy = float((predicted == y_test).mean())
    # Per-class accuracy on held-out real digits: how far a prediction of that class can be trusted.
    self.class_accuracy = np.array([(predicted[y_test == k] == k).mean() for k in range(10)])

  def metrics(self, samples: np.ndarray, *, min_count: int = 20) -> dict:
    """samples [n, H, W, 1] in [-1, 1] -> class coverage, histogram entropy (nats; log 10 = 2.303
    is uniform) and confidence; the histogram is returned as `class_counts`."""
    probs = self._clf.predict_proba(np.asarray(samples).reshape(len(samples), -1))
    predicted, confidence = probs.argmax(1), probs.max(1)
    counts = np.bincount(predicted, minlength=10)
    freq = counts / counts.sum()
    entropy = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    return dict(classes_covered=int((counts >= min_count).sum()), class_entropy=entropy,
                classifier_confidence=float(confidence.mean()),
                accuracy_weighted_confidence=float((confidence * self.class_accuracy[predicted]).mean()),
                classifier_real_accuracy=self.test_accuracy, class_counts=counts)


def max_class_entropy() -> float:
  return math.log(10)

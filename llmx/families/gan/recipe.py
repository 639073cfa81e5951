"""The GAN recipe: the one place a GAN config becomes modules (validation, models, optimizers)
and a run (`RECIPE`, trained by `llmx.train.run.train`). The data is in data.py, the adversarial
step in step.py, the metrics and figures in evaluate.py."""
import functools
import logging
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmx.families.gan import data, evaluate, model as gan_lib
from llmx.families.gan.step import adversarial
from llmx.train import losses, optimizers
from llmx.train.config_check import ConfigError, require_choice, require_positive, require_range
from llmx.train.recipe import Experiment, Recipe

log = logging.getLogger("llmx")


def validate(c: ml_collections.ConfigDict):
  """Checks every field before anything is built or compiled."""
  require_choice(c, "data.name", data.DATASETS)
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
  require_choice(c, "train.schedule", ("constant", "linear"))
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
  centres, _ = data.mode_centres(c.data.name)
  scale = float(np.sqrt(np.mean(np.square(centres))))  # per-coordinate RMS: grid 2.83, ring 1.41
  return gan_lib.GAN(
      gan_lib.MLPGenerator(m.noise_dim, 2, hidden=m.hidden, depth=m.depth, data_scale=scale,
                           rngs=rngs),
      gan_lib.MLPDiscriminator(2, hidden=m.hidden, depth=m.depth, data_scale=scale, rngs=rngs))


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del mesh  # batches are split by process; the loop places them on the mesh
  digit_images = classifier = None
  if c.data.name == "digits":
    digit_images, labels = data.load_digits(c.data.image_size)
    classifier = evaluate.DigitClassifier(digit_images, labels, seed=c.train.seed)
    log.info("digit classifier: %.3f held-out accuracy on real digits", classifier.test_accuracy)
  # The discriminator's learning-rate schedule counts its n_critic updates per step.
  g_tx, _ = optimizers.from_config(c.train)
  d_tx, _ = optimizers.from_config(c.train, steps=c.train.steps * c.gan.n_critic,
                                   learning_rate=c.train.d_learning_rate)
  trainable = adversarial(build_gan(c), g_tx, d_tx, loss=c.gan.loss, n_critic=c.gan.n_critic,
                          batch_size=c.train.batch_size, gp_weight=c.gan.gp_weight,
                          seed=c.train.seed)
  train_batches = data.real_batches(c, seed=c.train.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), digit_images=digit_images)
  eval_batch = data.real_batches(c, seed=c.train.seed + 1, digit_images=digit_images)[0]
  meta = dict(must_match=dict(data=c.data.to_dict(), model=c.model.to_dict(), gan=c.gan.to_dict(),
                              batch_size=c.train.batch_size, seed=c.train.seed),
              config=c.to_dict())
  # The summary line's seconds count from here: training, evaluations and checkpoints.
  start = time.perf_counter()
  return Experiment(
      trainable=trainable, train_batches=train_batches, eval_batches=[eval_batch], meta=meta,
      evaluate=evaluate.evaluator(c, workdir, classifier),
      finish=functools.partial(evaluate.print_summary, c, start))


RECIPE = Recipe("gan", validate, experiment)

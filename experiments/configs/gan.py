"""Generative adversarial networks on 2-D mixtures (mode collapse) and 8x8 digits.

Launch:
  python -m experiments.train_gan --config=experiments/configs/gan.py:grid --workdir=/tmp/gan_grid
  python -m experiments.train_gan --config=experiments/configs/gan.py:ring --workdir=/tmp/gan_ring
  python -m experiments.train_gan --config=experiments/configs/gan.py:digits --workdir=/tmp/gan_digits
  ... --config.gan.loss=wgan_gp --config.gan.n_critic=5 --config.train.seed=1

Variants (each writes metrics.jsonl, TensorBoard events, checkpoints and samples_<step>.png):
  grid    25 Gaussians at {-4,-2,0,2,4}^2, std 0.05; MLP pair. Hardware: 2 CPU cores, ~TBD.
          Expected: modes_captured 25/25, high_quality_fraction >= 0.9 (results/gan.md).
  ring    8 Gaussians on a circle of radius 2, std 0.02; MLP pair. Hardware: 2 CPU cores, ~TBD.
          Expected: modes_captured 8/8, high_quality_fraction >= 0.9.
  digits  scikit-learn's bundled 8x8 digits in [-1, 1]; DCGAN pair. Hardware: 2 CPU cores, ~TBD.
          Expected: all 10 classes, class entropy near log(10) = 2.303.
  smoke   a few steps of the grid set-up, for tests.
Losses (gan.loss): minimax, non_saturating, hinge, wgan_gp (gan.gp_weight; use gan.n_critic=5).
"""
import ml_collections

VARIANTS = ("grid", "ring", "digits", "smoke")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      name="grid",            # ring | grid | digits
      image_size=8,           # digits only: resized to this (the DCGAN makes 8, 16, 32, ...)
  ))
  c.model = ml_collections.ConfigDict(dict(
      noise_dim=16,
      hidden=256, depth=3,    # MLP pair (ring, grid)
      width=32,               # DCGAN pair (digits): channels at full resolution
  ))
  c.gan = ml_collections.ConfigDict(dict(
      loss="hinge",           # minimax | non_saturating | hinge | wgan_gp
      n_critic=1,             # discriminator updates per generator update
      gp_weight=0.0,          # gradient penalty weight, any loss; wgan_gp needs > 0
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=5000, batch_size=256,
      learning_rate=2e-4,     # the generator's
      d_learning_rate=2e-4,
      beta1=0.5, beta2=0.999, lr_decay="constant",  # constant | linear (to 0 at train.steps)
      eval_every=1000, checkpoint_every=1000, log_every=100, max_checkpoints=2, seed=0,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_samples=2500, seed=1234))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if variant in (None, "", "grid"):
    pass
  elif variant == "ring":
    c.data.name = "ring"
  elif variant == "digits":
    c.data.name = "digits"
    c.model.noise_dim = 64
    c.train.update(steps=3000, batch_size=128, eval_every=1000)
  elif variant == "smoke":
    c.model.update(hidden=32, depth=2, noise_dim=4, width=8)
    c.train.update(steps=20, batch_size=32, eval_every=10, checkpoint_every=10, log_every=5)
    c.eval.num_samples = 500
  else:
    from llmx.train.config_check import ConfigError
    raise ConfigError(f"unknown variant {variant!r} of gan.py: use one of {', '.join(map(repr, VARIANTS))}")
  return c

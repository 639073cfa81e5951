"""The GAN's real data: the 2-D Gaussian mixtures of the mode-collapse literature and
scikit-learn's 8x8 digits, as a grain dataset indexed by generator step."""
import grain
import jax
import ml_collections
import numpy as np

from llmx.train.config_check import ConfigError

DATASETS = ("ring", "grid", "digits")


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

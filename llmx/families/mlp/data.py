"""Scikit-learn's bundled breast-cancer set (Wisconsin diagnostic: 569 tumours, 30 features,
212 malignant / 357 benign; nothing is downloaded), split once and served as batches by step."""
import dataclasses

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """x: float32 [rows, features], standardised; y: float32 [rows], 1 = benign, 0 = malignant."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_breast_cancer(*, test_fraction: float, seed: int) -> Split:
  """A stratified held-out split fixed by `seed`; every feature standardised with the training
  rows' mean and standard deviation only, so nothing of the held-out rows leaks into training."""
  from sklearn.datasets import load_breast_cancer as sk_load
  from sklearn.model_selection import train_test_split
  x, y = sk_load(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  mean, std = x_train.mean(0), x_train.std(0)
  scale = lambda a: ((a - mean) / std).astype(np.float32)
  return Split(scale(x_train), y_train.astype(np.float32), scale(x_test), y_test.astype(np.float32))


def batches(x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int) -> grain.MapDataset:
  """Item `step`: {x [batch_size, features], y [batch_size]}, batch `step` of an endless run of
  epochs, each a fresh shuffle of the rows fixed by (seed, epoch) and cut into whole batches (the
  rest of an epoch's rows wait for the next one). A function of the step alone, so a resumed run
  sees the same batches."""
  per_epoch = len(x) // batch_size

  def batch(step):
    epoch, i = divmod(int(step), per_epoch)
    rows = np.random.default_rng((seed, epoch)).permutation(len(x))[i * batch_size:(i + 1) * batch_size]
    return {"x": x[rows], "y": y[rows]}

  return grain.MapDataset.range(2**40).map(batch)

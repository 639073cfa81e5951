"""Measuring a GAN: the mode-collapse protocol on the 2-D mixtures, a digit classifier's reading
of generated digits, the samples_<step>.png figure, the per-evaluation metrics and the final
summary line of a run."""
import logging
import math
import pathlib
import time

import jax
import ml_collections
import numpy as np

from llmx.families.gan import data

log = logging.getLogger("llmx")

# The class entropy (nats) of a uniform histogram over the 10 digits: what no collapse reads.
UNIFORM_CLASS_ENTROPY = math.log(10)


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


def plot_samples(path: pathlib.Path, samples: np.ndarray, dataset: str, title: str,
                 class_counts: np.ndarray | None = None):
  """ring/grid: a scatter of the samples [n, 2] over the mode centres; digits: a 10x10 grid of
  samples [n, H, W, 1] beside the classifier's class histogram of all of them (`class_counts`
  [10])."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if dataset == "digits":
    n = 10
    images = samples[:n * n, ..., 0].reshape(n, n, *samples.shape[1:3])
    tiled = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1)
    tiled = tiled.transpose(0, 2, 1, 3).reshape(n * tiled.shape[2], n * tiled.shape[3])
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 5), width_ratios=(1, 0.8))
    ax.imshow(tiled, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    hist.bar(np.arange(10), class_counts / class_counts.sum(), color="tab:blue")
    hist.axhline(0.1, color="tab:red", lw=1, ls="--", label="uniform")
    hist.set(xticks=np.arange(10), xlabel="classifier's class", ylabel="fraction of samples")
    hist.legend(fontsize=7)
  else:
    centres, _ = data.mode_centres(dataset)
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4, color="tab:blue", label="generated")
    ax.scatter(centres[:, 0], centres[:, 1], s=12, marker="x", color="tab:red", label="mode centres")
    lim = 5.5 if dataset == "grid" else 3
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax.legend(loc="upper right", fontsize=6, markerscale=3)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def evaluator(c: ml_collections.ConfigDict, workdir: str,
              classifier: DigitClassifier | None = None):
  """-> on_eval(model, step): draws eval.num_samples samples from fixed noise (eval.seed), returns
  their metrics (digits: the classifier's, with the histogram as class_count_<k>; mixtures: the
  mode-collapse protocol's and min_mode_count) and writes WORKDIR/samples_<step>.png."""
  if classifier is None:
    centres, std = data.mode_centres(c.data.name)

  def on_eval(model, step):
    samples = np.asarray(model.sample(jax.random.key(c.eval.seed), c.eval.num_samples))
    if classifier is not None:
      metrics = classifier.metrics(samples)
      counts = metrics.pop("class_counts")
      metrics.update({f"class_count_{k}": int(n) for k, n in enumerate(counts)})
      title = (f"{c.data.name}, step {step}: {metrics['classes_covered']}/10 classes, "
               f"entropy {metrics['class_entropy']:.3f} (uniform {UNIFORM_CLASS_ENTROPY:.3f})")
      log.info("class histogram at step %d: %s", step, counts.tolist())
    else:
      metrics = mode_collapse_metrics(samples, centres, std)
      counts = metrics.pop("mode_counts")
      metrics["min_mode_count"] = int(counts.min())
      title = (f"{c.data.name}, step {step}: {metrics['modes_captured']}/{len(centres)} modes, "
               f"{100 * metrics['high_quality_fraction']:.1f}% high quality")
    if jax.process_index() == 0:
      plot_samples(pathlib.Path(workdir) / f"samples_{step}.png", samples, c.data.name,
                   f"{title} ({c.gan.loss})",
                   class_counts=counts if classifier is not None else None)
    return metrics

  return on_eval


SUMMARY_KEYS = ("modes_captured", "high_quality_fraction", "classes_covered", "class_entropy",
                "classifier_confidence", "accuracy_weighted_confidence")


def print_summary(c: ml_collections.ConfigDict, start: float, result) -> dict:
  """Prints the run's last logged metrics as one line, with the seconds since `start`
  (time.perf_counter() when training began); -> those metrics."""
  final = result.history[-1] if result.history else {}
  summary = {k: final[k] for k in SUMMARY_KEYS if k in final}
  text = " | ".join(f"{k} {v:.4g}" for k, v in summary.items())
  print(f"--- {c.data.name} {c.gan.loss} seed {c.train.seed}: step {result.step}, "
        f"{time.perf_counter() - start:.1f} s: {text} ---", flush=True)
  return summary

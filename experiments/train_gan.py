r"""Trains a GAN and measures mode collapse. See experiments/configs/gan.py for the variants.

  python -m experiments.train_gan --config=experiments/configs/gan.py:grid --workdir=/tmp/gan_grid

At each evaluation it draws eval.num_samples samples (2,500: the VEEGAN/PacGAN protocol), writes
their metrics to metrics.jsonl (ring/grid: modes_captured, high_quality_fraction; digits:
classes_covered, class_entropy, classifier_confidence, accuracy_weighted_confidence) and a figure
to WORKDIR/samples_<step>.png.
"""
import logging
import pathlib
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llmx.families.gan import recipe as gan_setup
from llmx.train.launch import run
from llmx.train import loop
from llmx.train.mesh import make_mesh

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/gan.py:grid", "GAN config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints, figures.", required=True)


def plot_samples(path: pathlib.Path, samples: np.ndarray, c, title: str,
                 class_counts: np.ndarray | None = None):
  """ring/grid: a scatter of the samples over the mode centres; digits: a 10x10 grid of samples
  beside the classifier's class histogram of all of them (`class_counts` [10])."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if c.data.name == "digits":
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
    centres, _ = gan_setup.mode_centres(c.data.name)
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4, color="tab:blue", label="generated")
    ax.scatter(centres[:, 0], centres[:, 1], s=12, marker="x", color="tab:red", label="mode centres")
    lim = 5.5 if c.data.name == "grid" else 3
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax.legend(loc="upper right", fontsize=6, markerscale=3)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv):
  del argv
  c = _CONFIG.value
  gan_setup.validate(c)
  workdir = pathlib.Path(_WORKDIR.value)
  digit_images = classifier = None
  if c.data.name == "digits":
    digit_images, labels = gan_setup.load_digits(c.data.image_size)
    classifier = gan_setup.DigitClassifier(digit_images, labels, seed=c.train.seed)
    log.info("digit classifier: %.3f held-out accuracy on real digits", classifier.test_accuracy)
  else:
    centres, std = gan_setup.mode_centres(c.data.name)

  gan = gan_setup.build_gan(c)
  g_tx, d_tx = gan_setup.build_optimizers(c)
  trainable = gan_setup.adversarial(gan, g_tx, d_tx, loss=c.gan.loss, n_critic=c.gan.n_critic,
                                    batch_size=c.train.batch_size, gp_weight=c.gan.gp_weight,
                                    seed=c.train.seed)
  batches = dict(digit_images=digit_images)
  train_batches = gan_setup.real_batches(c, seed=c.train.seed, process_index=jax.process_index(),
                                         process_count=jax.process_count(), **batches)
  eval_batch = gan_setup.real_batches(c, seed=c.train.seed + 1, **batches)[0]

  def on_eval(model, step):
    samples = np.asarray(model.sample(jax.random.key(c.eval.seed), c.eval.num_samples))
    if classifier is not None:
      metrics = classifier.metrics(samples)
      counts = metrics.pop("class_counts")
      metrics.update({f"class_count_{k}": int(n) for k, n in enumerate(counts)})
      title = (f"{c.data.name}, step {step}: {metrics['classes_covered']}/10 classes, "
               f"entropy {metrics['class_entropy']:.3f} (uniform {gan_setup.max_class_entropy():.3f})")
      log.info("class histogram at step %d: %s", step, counts.tolist())
    else:
      metrics = gan_setup.mode_collapse_metrics(samples, centres, std)
      counts = metrics.pop("mode_counts")
      metrics["min_mode_count"] = int(counts.min())
      title = (f"{c.data.name}, step {step}: {metrics['modes_captured']}/{len(centres)} modes, "
               f"{100 * metrics['high_quality_fraction']:.1f}% high quality")
    if jax.process_index() == 0:
      plot_samples(workdir / f"samples_{step}.png", samples, c, f"{title} ({c.gan.loss})",
                   class_counts=counts if classifier is not None else None)
    return metrics

  meta = dict(must_match=dict(data=c.data.to_dict(), model=c.model.to_dict(), gan=c.gan.to_dict(),
                              batch_size=c.train.batch_size, seed=c.train.seed),
              config=c.to_dict())
  start = time.perf_counter()
  result = loop.train(
      trainable, mesh=make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
      train_batches=train_batches, eval_batches=[eval_batch], workdir=str(workdir), meta=meta,
      on_eval=on_eval,
      options=loop.LoopOptions(steps=c.train.steps, eval_every=c.train.eval_every,
                               checkpoint_every=c.train.checkpoint_every,
                               log_every=c.train.log_every, max_to_keep=c.train.max_checkpoints))
  final = result.history[-1] if result.history else {}
  keys = ("modes_captured", "high_quality_fraction", "classes_covered", "class_entropy",
          "classifier_confidence", "accuracy_weighted_confidence")
  summary = " | ".join(f"{k} {final[k]:.4g}" for k in keys if k in final)
  print(f"--- {c.data.name} {c.gan.loss} seed {c.train.seed}: step {result.step}, "
        f"{time.perf_counter() - start:.1f} s: {summary} ---", flush=True)


if __name__ == "__main__":
  run(main)

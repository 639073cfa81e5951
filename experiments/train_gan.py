r"""Trains a GAN and measures mode collapse. See experiments/configs/gan.py for the variants.

  python -m experiments.train_gan --config=experiments/configs/gan.py:grid --workdir=/tmp/gan_grid

At each evaluation it draws eval.num_samples samples (2,500: the VEEGAN/PacGAN protocol), writes
their metrics to metrics.jsonl (ring/grid: modes_captured, high_quality_fraction; digits:
classes_covered, class_entropy, classifier_confidence, accuracy_weighted_confidence) and a figure
to WORKDIR/samples_<step>.png. The last line printed sums up the run. Re-running the same command
resumes.
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.gan import recipe as gan
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/gan.py:grid", "GAN config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints, figures.", required=True)


def main(argv):
  del argv
  run.train(gan.RECIPE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

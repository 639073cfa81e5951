r"""Trains the two-layer MLP classifier on the breast-cancer set and prints its held-out accuracy.
See experiments/configs/mlp.py for the launch command and the expected result.

  python -m experiments.mlp_classifier --config=experiments/configs/mlp.py --workdir=/tmp/mlp

Writes WORKDIR/metrics.jsonl (val_accuracy at each evaluation), TensorBoard events and
checkpoints; re-running the same command resumes (give a larger --config.train.steps to train on).
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.mlp.recipe import RECIPE
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/mlp.py", "MLP config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(RECIPE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

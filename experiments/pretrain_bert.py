r"""Pretrains BERT (MLM + NSP) from scratch. See experiments/configs/bert.py for launch commands.

  python -m experiments.pretrain_bert --config=experiments/configs/bert.py --workdir=/tmp/bert
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.bert import pretrain
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/bert.py", "BERT config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(pretrain.PRETRAIN, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

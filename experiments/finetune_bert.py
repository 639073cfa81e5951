r"""Fine-tunes a pretrained BERT on a task. See experiments/configs/finetune.py for launch commands.

  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:sst2 --workdir=/tmp/sst2
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.bert import finetune
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/finetune.py", "Fine-tuning config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(finetune.FINETUNE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

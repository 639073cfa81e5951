r"""Fine-tunes a pretrained decoder LM on chat data (full or LoRA). See experiments/configs/sft.py.

  python -m experiments.finetune_lm --config=experiments/configs/sft.py:chitchat_lora --workdir=/tmp/chitchat

Re-running the same command resumes; the merged model is exported to WORKDIR/export at the end.
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.lm import sft
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/sft.py", "SFT config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(sft.FINETUNE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

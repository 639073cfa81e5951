r"""Pretrains a decoder-only LM. See experiments/configs/lm.py for launch commands and variants.

  python -m experiments.pretrain_lm --config=experiments/configs/lm.py --workdir=/tmp/lm

Scale-out (BUILD.md): `--config.mesh.fsdp=-1` shards parameters and optimizer state over all
devices; several processes (hosts) join with --coordinator_address/--num_processes/--process_id,
or by themselves on TPU pods and under SLURM. Re-running the same command resumes.
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.lm import recipe
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/lm.py", "LM config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(recipe.RECIPE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

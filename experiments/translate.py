r"""Translates English sentences with the model in a run folder (beam search by default).

  python -m experiments.translate --workdir=/tmp/enfr "Where is the station?" "I like tea."
  python -m experiments.translate --workdir=/tmp/enfr --beam_size=1 "Hello."   # greedy
  python -m experiments.translate --workdir=/tmp/enfr --beam_size=1 --temperature=0.8 \
      --top_p=0.9 --seed=0 "Hello."                                            # a sample

One translation per line on stdout, in the order of the sentences. An empty sentence, or one
longer than the model's max_len subwords, is an error (exit 2) rather than a silent cut. The
decoding flags are llmx/inference/cli.py's, the same as experiments/generate.py's.

  # BLEU of the newest checkpoint on the run's test (or val) split, as training reports it
  python -m experiments.translate --workdir=/tmp/enfr --bleu_split=test
"""
from absl import flags

from llmx.families.seq2seq import evaluate, recipe as setup
from llmx.inference import DecodingError, cli as decoding_flags
from llmx.train.launch import run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.", required=True)
_BLEU_SPLIT = flags.DEFINE_enum("bleu_split", "", ["", "test", "val"], "Instead of sentences: "
                                "translate this split of the run's data and print its BLEU.")
_BLEU_PAIRS = flags.DEFINE_integer("bleu_pairs", 0, "With --bleu_split: the first N pairs; 0: all.")
_REPORT = flags.DEFINE_string("report", "", "With --bleu_split: also write the report as JSON "
                              "here (the run folder is never written to).")


def main(argv):
  sentences = argv[1:]
  if sentences and _BLEU_SPLIT.value:
    raise DecodingError("give sentences or --bleu_split, not both")
  if not sentences and not _BLEU_SPLIT.value:
    raise DecodingError('no sentence given: python -m experiments.translate --workdir=DIR '
                        '"an English sentence"')
  options = decoding_flags.options()  # bad values fail before the checkpoint is read
  for i, s in enumerate(sentences):
    if not s.strip():
      raise evaluate.TranslationError(f"sentence {i} is empty: nothing to translate")
  model, tokenizer, config, step = setup.load_run(_WORKDIR.value)
  options["stop_tokens"] = decoding_flags.stop_tokens(tokenizer)
  if _BLEU_SPLIT.value:
    pairs = getattr(setup.load_split(config), _BLEU_SPLIT.value)[:_BLEU_PAIRS.value or None]
    report, path = evaluate.split_bleu(model, tokenizer, pairs, step=step, split=_BLEU_SPLIT.value,
                                       out=_REPORT.value or None,
                                       batch_size=config.eval.decode_batch, **options)
    print(f"{report['split']} BLEU {report['bleu']:.2f} at step {step} ({report['pairs']} pairs, "
          f"beam {options['beam_size']}, length penalty {options['length_penalty']}, "
          f"{report['truncated']} truncated, {report['decode_seconds']:.0f} s); "
          f"{report['signature']}" + (f"; written to {path}" if path else ""), flush=True)
    return
  translations, _ = evaluate.translate(model, tokenizer, sentences, **options)
  print("\n".join(translations), flush=True)


if __name__ == "__main__":
  decoding_flags.define_flags(beam_size=4, temperature=0.0, max_new_tokens=None)
  run(main)

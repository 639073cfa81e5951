r"""Translates English sentences with the model in a run folder (beam search by default).

  python -m experiments.translate --workdir=/tmp/enfr "Where is the station?" "I like tea."
  python -m experiments.translate --workdir=/tmp/enfr --beam_size=1 --length_penalty=0 "Hello."

One translation per line on stdout, in the order of the sentences. An empty sentence, or one
longer than the model's max_len subwords, is an error (exit 2) rather than a silent cut.

  # BLEU of the newest checkpoint on the run's test (or val) split, as training reports it
  python -m experiments.translate --workdir=/tmp/enfr --bleu_split=test
"""
import json
import pathlib
import time

from absl import flags

from llmx.train.launch import run
from llmx.families.seq2seq import evaluate, recipe as setup
from llmx.inference.search import DecodingError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with checkpoints/.", required=True)
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beams; 1 with --length_penalty=0 is greedy.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.6, "GNMT length penalty alpha.")
_BLEU_SPLIT = flags.DEFINE_enum("bleu_split", "", ["", "test", "val"], "Instead of sentences: "
                                "translate this split of the run's data and print its BLEU.")
_BLEU_PAIRS = flags.DEFINE_integer("bleu_pairs", 0, "With --bleu_split: the first N pairs; 0: all.")


def split_bleu(model, tokenizer, config, step):
  """BLEU on the run's own test or validation split (the same fixed-seed split)."""
  data = setup.load_split(config)
  pairs = getattr(data, _BLEU_SPLIT.value)
  if _BLEU_PAIRS.value:
    pairs = pairs[:_BLEU_PAIRS.value]
  start = time.perf_counter()
  hyps, truncated = evaluate.translate(model, tokenizer, [p[0] for p in pairs],
                                    beam_size=_BEAM.value, length_penalty=_LENGTH_PENALTY.value,
                                    batch_size=config.eval.decode_batch, truncate=True)
  score, signature = evaluate.bleu_with_signature(hyps, [p[1] for p in pairs])
  report = dict(step=step, split=_BLEU_SPLIT.value, bleu=score, pairs=len(pairs),
                beam_size=_BEAM.value, length_penalty=_LENGTH_PENALTY.value, truncated=truncated,
                decode_seconds=time.perf_counter() - start, signature=signature)
  path = pathlib.Path(_WORKDIR.value, f"{_BLEU_SPLIT.value}_bleu_step{step}.json")
  path.write_text(json.dumps(report, indent=2) + "\n")
  print(f"{_BLEU_SPLIT.value} BLEU {score:.2f} at step {step} ({len(pairs)} pairs, beam "
        f"{_BEAM.value}, length penalty {_LENGTH_PENALTY.value}, {truncated} truncated, "
        f"{report['decode_seconds']:.0f} s); {signature}; written to {path}", flush=True)


def main(argv):
  sentences = argv[1:]
  if sentences and _BLEU_SPLIT.value:
    raise DecodingError("give sentences or --bleu_split, not both")
  if not sentences and not _BLEU_SPLIT.value:
    raise DecodingError('no sentence given: python -m experiments.translate --workdir=DIR '
                        '"an English sentence"')
  if _BEAM.value < 1:
    raise DecodingError(f"--beam_size={_BEAM.value}: must be >= 1")
  if _LENGTH_PENALTY.value < 0:
    raise DecodingError(f"--length_penalty={_LENGTH_PENALTY.value}: must be >= 0")
  for i, s in enumerate(sentences):  # before the checkpoint is read: a quick answer
    if not s.strip():
      raise evaluate.TranslationError(f"sentence {i} is empty: nothing to translate")
  model, tokenizer, config, step = setup.load_run(_WORKDIR.value)
  if _BLEU_SPLIT.value:
    return split_bleu(model, tokenizer, config, step)
  translations, _ = evaluate.translate(model, tokenizer, sentences, beam_size=_BEAM.value,
                                    length_penalty=_LENGTH_PENALTY.value)
  print("\n".join(translations), flush=True)


if __name__ == "__main__":
  run(main)

"""Translating with a trained model and scoring it: batched greedy / beam search, sacreBLEU, the
validation-BLEU evaluator and the final test-BLEU report of a run."""
import json
import logging
import pathlib
import time

import jax
import numpy as np

from llmx.data import translation as data_lib
from llmx.families.seq2seq.model import Transformer
from llmx import inference

log = logging.getLogger("llmx")


class TranslationError(inference.DecodingError):
  pass


def translate(model: Transformer, tokenizer: data_lib.SubwordTokenizer, sentences: list[str], *,
              beam_size: int = 4, length_penalty: float = 0.6, batch_size: int = 250,
              truncate: bool = False, **options) -> tuple[list[str], int]:
  """English sentences -> (French sentences, number of sources truncated).

  beam_size 1 is greedy decoding, or sampling with options such as temperature=0.8, top_p=0.9,
  seed=0 (the options of llmx.inference.decode: also stop_tokens, max_new_tokens,
  early_stopping, ...). An empty sentence raises
  TranslationError; one longer than model.max_len tokens raises it too unless truncate=True
  (its first max_len - 1 subwords are translated). Sentences are decoded in batches sorted by
  length, so that each batch pads little.
  """
  for i, s in enumerate(sentences):
    if not s.strip():
      raise TranslationError(f"sentence {i} is empty: nothing to translate")
  ids = [np.concatenate([x, [tokenizer.eos_id]]).astype(np.int32)
         for x in tokenizer.encode_batch(sentences)]
  max_len = model.config.max_len
  if not truncate:
    for i, x in enumerate(ids):
      if x.size > max_len:
        raise TranslationError(f"sentence {i} is {x.size} subwords long (with </s>), more than "
                               f"the model's max_len={max_len}: split it into shorter sentences")
  order = np.argsort([x.size for x in ids], kind="stable")
  out, truncated = [None] * len(ids), 0
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    batch = [ids[i] for i in chunk]
    result = inference.decode_sources(model, batch, bos_id=tokenizer.bos_id,
                                      eos_id=tokenizer.eos_id, truncate=truncate,
                                      beam_size=beam_size, length_penalty=length_penalty,
                                      **options)
    truncated += result.truncated
    for i, tokens in zip(chunk, result.continuations):
      out[i] = tokenizer.decode(tokens)
  return out, truncated


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU of detokenised text, sacreBLEU's defaults (13a tokenisation, one reference)."""
  return bleu_with_signature(hypotheses, references)[0]


def bleu_with_signature(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
  """-> (BLEU, sacreBLEU's signature string of the settings, for reports)."""
  import sacrebleu
  metric = sacrebleu.BLEU()
  score = metric.corpus_score(hypotheses, [references]).score
  return score, str(metric.get_signature())


def evaluate_bleu(model, tokenizer, pairs, *, beam_size, length_penalty, batch_size):
  """-> (BLEU, sacreBLEU signature, hypotheses, sources truncated, seconds)."""
  start = time.perf_counter()
  hyps, truncated = translate(model, tokenizer, [p[0] for p in pairs], beam_size=beam_size,
                              length_penalty=length_penalty, batch_size=batch_size, truncate=True)
  score, signature = bleu_with_signature(hyps, [p[1] for p in pairs])
  return score, signature, hyps, truncated, time.perf_counter() - start


def val_bleu_evaluator(tokenizer, pairs):
  """The loop's evaluator: greedy BLEU on `pairs` (validation), logged as val_bleu."""
  def evaluate(model, step):
    if not pairs:
      return {}
    score, _, hyps, _, seconds = evaluate_bleu(model, tokenizer, pairs, beam_size=1,
                                               length_penalty=0.0, batch_size=len(pairs))
    log.info("step %d | val greedy BLEU %.2f on %d pairs (%.1f s) | e.g. %r -> %r", step, score,
             len(pairs), seconds, pairs[0][0], hyps[0])
    return dict(val_bleu=score)
  return evaluate


def report_test_bleu(c, tokenizer, test_pairs, result, *, workdir: str, n_params: int):
  """After training: test BLEU with beam search over the whole test split, printed and written
  to WORKDIR/test_bleu.json."""
  if not c.eval.test or result.preempted or jax.process_index() != 0:
    return
  e = c.eval
  score, signature, hyps, truncated, seconds = evaluate_bleu(
      result.model, tokenizer, test_pairs, beam_size=e.beam_size,
      length_penalty=e.length_penalty, batch_size=e.decode_batch)
  report = dict(step=result.step, test_bleu=score, pairs=len(test_pairs), beam_size=e.beam_size,
                length_penalty=e.length_penalty, truncated=truncated, decode_seconds=seconds,
                n_params=n_params, signature=signature)
  pathlib.Path(workdir, "test_bleu.json").write_text(json.dumps(report, indent=2) + "\n")
  examples = "\n".join(f"  {s!r} -> {h!r} (ref {r!r})" for (s, r), h in zip(test_pairs[:5], hyps[:5]))
  print(f"test BLEU {score:.2f} ({len(hyps)} pairs, beam {e.beam_size}, length penalty "
        f"{e.length_penalty}, {truncated} sources truncated, {seconds:.0f} s) at step "
        f"{result.step}; {signature}\n{examples}", flush=True)


def split_bleu(model, tokenizer, pairs, *, step: int, split: str, batch_size: int,
               out: str | None = None, **options) -> tuple[dict, pathlib.Path | None]:
  """BLEU on (source, reference) `pairs` of the run's `split` -> (report, the JSON file it was
  written to: `out`, or None when not given; a read-only tool writes nothing into the run)."""
  start = time.perf_counter()
  hyps, truncated = translate(model, tokenizer, [p[0] for p in pairs], truncate=True,
                              batch_size=batch_size, **options)
  score, signature = bleu_with_signature(hyps, [p[1] for p in pairs])
  report = dict(step=step, split=split, bleu=score, pairs=len(pairs), truncated=truncated,
                decode_seconds=time.perf_counter() - start, signature=signature, **options)
  path = None
  if out:
    path = pathlib.Path(out)
    path.write_text(json.dumps(report, indent=2) + "\n")
  return report, path

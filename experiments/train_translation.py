r"""Trains the encoder-decoder Transformer to translate English to French (Tatoeba pairs). See
experiments/configs/translation.py for the launch command and the expected result.

  python -m experiments.train_translation --config=experiments/configs/translation.py \
      --workdir=/tmp/enfr

Every train.eval_every steps: validation loss and greedy BLEU on data.bleu_val_pairs
validation pairs (logged as val_bleu); after the last step: test BLEU with beam search over the
whole test split, printed and written to DIR/test_bleu.json. Re-running the same command resumes.
"""
import dataclasses
import functools
import json
import logging
import pathlib
import time

import jax
from absl import flags
from ml_collections import config_flags

from llmx.train.launch import run
from llmx.families.seq2seq import recipe as setup
from llmx.data import translation as data_lib
from llmx.train import loop
from llmx.train.mesh import check_batch_size, data_shard, mesh_from_config, process_rows
from llmx.train.step import supervised

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/translation.py",
                                          "Translation config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def evaluate_bleu(model, tokenizer, pairs, *, beam_size, length_penalty, batch_size):
  """-> (BLEU, sacreBLEU signature, hypotheses, sources truncated, seconds)."""
  start = time.perf_counter()
  hyps, truncated = setup.translate(model, tokenizer, [p[0] for p in pairs], beam_size=beam_size,
                                    length_penalty=length_penalty, batch_size=batch_size,
                                    truncate=True)
  score, signature = setup.bleu_with_signature(hyps, [p[1] for p in pairs])
  return score, signature, hyps, truncated, time.perf_counter() - start


def main(argv):
  del argv
  c = _CONFIG.value
  setup.validate(c)
  mesh = mesh_from_config(c.mesh)
  data = setup.load_data(c)
  model_config = setup.model_config(c, data.tokenizer.vocab_size)
  build_model = functools.partial(setup.build_model, model_config, c.train.seed)
  tx, schedule = setup.build_optimizer(c)
  trainable = supervised(build_model, tx, setup.loss_fn(c))
  n_params = setup.param_count(model_config)

  rows_multiple = 8 * jax.device_count()
  batches = data_lib.TokenBatches(data.train, tokens_per_batch=c.train.tokens_per_batch,
                                  max_len=c.data.max_train_len, seed=c.train.seed,
                                  row_multiple=rows_multiple)
  for rows in batches.rows:
    check_batch_size(mesh, rows, field="rows of a train.tokens_per_batch batch")
  shard_index, shard_count = data_shard(mesh, batches.rows[0])
  val = data_lib.encode_pairs(data.tokenizer, data.splits.val, max_len=c.data.max_train_len)
  # One shape for every evaluation batch (the longest bucket): one compilation.
  eval_batches = data_lib.eval_batches(val, tokens_per_batch=c.train.tokens_per_batch,
                                       max_len=c.data.max_train_len,
                                       num_batches=c.train.eval_batches)
  log.info("model: %.2fM parameters, vocab %d; %d batches per epoch (rows per length: %s); "
           "%d devices", n_params / 1e6, data.tokenizer.vocab_size, batches.batches_per_epoch,
           dict(zip(batches.buckets, batches.rows)), jax.device_count())

  bleu_pairs = data.splits.val[:c.data.bleu_val_pairs]

  def on_eval(model, step):
    if not bleu_pairs:
      return {}
    score, _, hyps, _, seconds = evaluate_bleu(model, data.tokenizer, bleu_pairs, beam_size=1,
                                            length_penalty=0.0, batch_size=len(bleu_pairs))
    log.info("step %d | val greedy BLEU %.2f on %d pairs (%.1f s) | e.g. %r -> %r", step, score,
             len(bleu_pairs), seconds, bleu_pairs[0][0], hyps[0])
    return dict(val_bleu=score)

  meta = dict(must_match=dict(model=dataclasses.asdict(model_config),
                              tokenizer=data.tokenizer.to_json()),
              config=c.to_dict(), n_params=n_params)
  result = loop.train(
      trainable, schedule=schedule, mesh=mesh,
      train_batches=data_lib.train_batches(batches, process_index=shard_index,
                                           process_count=shard_count),
      eval_batches=[process_rows(b, mesh) for b in eval_batches],
      workdir=_WORKDIR.value, meta=meta, on_eval=on_eval,
      options=loop.LoopOptions(
          steps=c.train.steps, eval_every=c.train.eval_every,
          checkpoint_every=c.train.checkpoint_every, log_every=c.train.log_every,
          max_to_keep=c.train.max_checkpoints, tokens_per_step=c.train.tokens_per_batch))

  if c.eval.test and not result.preempted and jax.process_index() == 0:
    e = c.eval
    score, signature, hyps, truncated, seconds = evaluate_bleu(
        result.model, data.tokenizer, data.splits.test, beam_size=e.beam_size,
        length_penalty=e.length_penalty, batch_size=e.decode_batch)
    report = dict(step=result.step, test_bleu=score, pairs=len(data.splits.test),
                  beam_size=e.beam_size, length_penalty=e.length_penalty, truncated=truncated,
                  decode_seconds=seconds, n_params=n_params, signature=signature)
    pathlib.Path(_WORKDIR.value, "test_bleu.json").write_text(json.dumps(report, indent=2) + "\n")
    examples = "\n".join(f"  {s!r} -> {h!r} (ref {r!r})"
                         for (s, r), h in zip(data.splits.test[:5], hyps[:5]))
    print(f"test BLEU {score:.2f} ({len(hyps)} pairs, beam {e.beam_size}, length penalty "
          f"{e.length_penalty}, {truncated} sources truncated, {seconds:.0f} s) at step "
          f"{result.step}; {report['signature']}\n{examples}", flush=True)


if __name__ == "__main__":
  run(main)

r"""Pretrains BERT (MLM + NSP) from scratch. See experiments/configs/bert.py for launch commands.

  python -m experiments.pretrain_bert --config=experiments/configs/bert.py --workdir=/tmp/bert
"""
import dataclasses
import logging
import pathlib

import jax
from absl import flags
from ml_collections import config_flags

from llmx.families.bert import recipe as bert_setup
from llmx.train.launch import run
from llmx.data import bert_pretraining
from llmx.families.bert import hf as bert_hf
from llmx.families.bert.model import flops_per_token, num_params
from llmx.train import loop
from llmx.train.mesh import make_mesh
from llmx.train.step import supervised

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/bert.py", "BERT config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def train_and_evaluate(c, workdir: str) -> loop.TrainResult:
  bert_setup.validate_pretrain(c)
  tokenizer, train, val, train_tokens = bert_setup.pretraining_data(c, workdir)
  config = bert_setup.model_config(c, tokenizer.vocab_size)
  model = bert_setup.build_pretraining_model(config, c.train.seed)
  tx, schedule = bert_setup.build_optimizer(c.train)
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)

  eval_batches = bert_pretraining.fixed_batches(val, batch_size=c.train.batch_size,
                                                num_batches=c.train.eval_batches)
  baseline = bert_pretraining.unigram_baseline(eval_batches, train_tokens)
  log.info("model: %.2fM parameters, vocab %d, %d train / %d val sentences, %d devices; "
           "unigram baseline MLM accuracy %.4f", num_params(model) / 1e6, tokenizer.vocab_size,
           train.num_sentences, val.num_sentences, jax.device_count(), baseline)
  meta = dict(
      kind="bert_pretraining",
      must_match=dict(model=dataclasses.asdict(config), tokenizer=tokenizer.fingerprint(),
                      data=c.data.to_dict(), seed=c.train.seed, batch_size=c.train.batch_size),
      config=c.to_dict(), tokenizer=tokenizer.to_json(), unigram_baseline=baseline)
  tokens_per_step = c.train.batch_size * c.data.max_len
  result = loop.train(
      supervised(model, tx, bert_setup.pretraining_loss), schedule=schedule, mesh=mesh,
      train_batches=bert_pretraining.pretraining_batches(
          train, batch_size=c.train.batch_size, process_index=jax.process_index(),
          process_count=jax.process_count()),
      eval_batches=eval_batches, workdir=workdir, meta=meta,
      on_eval=lambda model, step: dict(unigram_baseline=baseline),
      options=loop.LoopOptions(
          steps=c.train.steps, eval_every=c.train.eval_every,
          checkpoint_every=c.train.checkpoint_every, log_every=c.train.log_every,
          max_to_keep=c.train.max_checkpoints, tokens_per_step=tokens_per_step,
          flops_per_step=tokens_per_step * flops_per_token(config, c.data.max_len)))
  if jax.process_index() == 0:
    folder = bert_hf.save_pretrained(result.model, pathlib.Path(workdir) / "hf")
    tokenizer.save(folder)
    last = result.history[-1] if result.history else {}
    print(f"step {result.step}: val_mlm_accuracy {last.get('val_mlm_accuracy', float('nan')):.4f} "
          f"(unigram baseline {baseline:.4f}), val_nsp_accuracy "
          f"{last.get('val_nsp_accuracy', float('nan')):.4f}; Hugging Face folder: {folder}",
          flush=True)
  return result


def main(argv):
  del argv
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  run(main)

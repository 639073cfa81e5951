r"""Fine-tunes a pretrained BERT on a task. See experiments/configs/finetune.py for launch commands.

  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:sst2 --workdir=/tmp/sst2
"""
import dataclasses
import json
import logging
import pathlib
import time

import jax
from absl import flags
from ml_collections import config_flags

from llmx.families.bert import recipe as bert_setup
from llmx.train.launch import run
from llmx.data import tsv
from llmx.families.bert.model import num_params
from llmx.train import loop
from llmx.train.mesh import make_mesh
from llmx.train.step import supervised

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/finetune.py", "Fine-tuning config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def train_and_evaluate(c, workdir: str) -> dict:
  """-> the final dev metrics (also written to workdir/dev_metrics.json)."""
  started = time.perf_counter()
  bert_setup.validate_finetune(c)
  bert, tokenizer, source = bert_setup.load_encoder(c)
  train, dev, dev_rows, labels = bert_setup.task_data(c, tokenizer)
  model = bert_setup.build_task_model(c, bert, len(labels) if labels else None)
  tx, schedule = bert_setup.build_optimizer(c.train)
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  log.info("%s from %s: %.2fM parameters; %d train / %d dev examples; labels %s",
           c.task, source, num_params(model) / 1e6, len(train), len(dev), labels)
  evaluator = bert_setup.DevEvaluator(
      c.task, dev, dev_rows, batch_size=c.train.eval_batch_size, pad_id=tokenizer.pad_id,
      max_length=c.data.max_length, pad_multiple=c.data.pad_multiple)
  meta = dict(
      kind="bert_finetuning",
      must_match=dict(task=c.task, labels=labels, model=dataclasses.asdict(bert.config),
                      init_from=c.init_from, tokenizer=tokenizer.fingerprint(),
                      pooling=c.model.pooling, data=c.data.to_dict(), seed=c.train.seed,
                      batch_size=c.train.batch_size),
      config=c.to_dict())
  result = loop.train(
      supervised(model, tx, bert_setup.task_loss), schedule=schedule, mesh=mesh,
      train_batches=tsv.task_batches(
          train, batch_size=c.train.batch_size, seed=c.train.seed, pad_id=tokenizer.pad_id,
          max_length=c.data.max_length, pad_multiple=c.data.pad_multiple,
          group_by_length=c.data.group_by_length, process_index=jax.process_index(), process_count=jax.process_count()),
      eval_batches=[], on_eval=evaluator, workdir=workdir, meta=meta,
      options=loop.LoopOptions(
          steps=c.train.steps, eval_every=c.train.eval_every,
          checkpoint_every=c.train.checkpoint_every, log_every=c.train.log_every,
          max_to_keep=c.train.max_checkpoints))
  last = result.history[-1] if result.history else {}
  if last.get("step") == result.step and "val_loss" in last:  # the loop evaluated the last step
    final = {k: v for k, v in last.items() if k.startswith("val_")}
  else:  # resumed at train.steps: nothing trained this time
    final = evaluator(result.model, result.step)
  final.update(step=result.step, dev_examples=len(dev), seconds=time.perf_counter() - started,
               epochs=result.step * c.train.batch_size / len(train))
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / "dev_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    print("dev " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in final.items()), flush=True)
  return final


def main(argv):
  del argv
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  run(main)

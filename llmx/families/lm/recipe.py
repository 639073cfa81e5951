"""The decoder-LM recipe: the one place an LM config becomes modules (tokenizer, data, model,
optimizer, loss step) and a run (`RECIPE`, trained by `llmx.train.run.train`)."""
import dataclasses
import functools
import logging

import jax

import ml_collections
from flax import nnx

from llmx.data import corpus
from llmx.data.bpe_tokenizer import BPETokenizer
from llmx.data.char_tokenizer import CharTokenizer
from llmx.data.packing import split_packed
from llmx.families.lm import model as gpt
from llmx.families.lm.model import GPT, GPTConfig
from llmx.data.lm_windows import fixed_batches, lm_batches
from llmx.inference import generate
from llmx.nn.attention import ATTENTION_IMPLS
from llmx.nn.params import num_params
from llmx.train import optimizers, restore
from llmx.train.mesh import check_batch_size, data_shard, on_every_host, process_rows
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised
from llmx.train.config_check import (ConfigError, require_choice, require_divisible,
                                     require_positive, require_range)

log = logging.getLogger("llmx")


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
  require_choice(c, "model.attention_impl", ATTENTION_IMPLS)
  validate_modern(c)
  validate_scaling(c)


def validate_modern(c: ml_collections.ConfigDict):
  """The tokenizer and the LLaMA-style model switches."""
  require_choice(c, "data.tokenizer", ("char", "bpe"))
  if c.data.tokenizer_path and c.data.tokenizer != "bpe":
    raise ConfigError(f"data.tokenizer_path={c.data.tokenizer_path!r} needs data.tokenizer='bpe' "
                      f"(got {c.data.tokenizer!r})")
  if c.data.tokenizer == "bpe" and not c.data.tokenizer_path and c.data.vocab_size < 257:
    raise ConfigError(f"data.vocab_size={c.data.vocab_size!r}: must be an integer >= 257 (the "
                      f"256 bytes and an end-of-text token) for a byte-level BPE")
  require_positive(c, "model.n_kv_head", "model.mlp_hidden", allow_zero=True)
  if c.model.n_kv_head and c.model.n_head % c.model.n_kv_head:
    raise ConfigError(f"model.n_head={c.model.n_head} is not divisible by "
                      f"model.n_kv_head={c.model.n_kv_head}")
  require_choice(c, "model.positions", gpt.POSITIONS)
  require_choice(c, "model.norm", gpt.NORMS)
  require_choice(c, "model.mlp", gpt.MLPS)
  require_range(c, "model.rope_theta", 0.0, float("inf"), low_open=True)
  require_range(c, "model.logits_soft_cap", 0.0, float("inf"))
  require_range(c, "model.attn_logits_soft_cap", 0.0, float("inf"))
  if c.model.positions == "rope" and (c.model.d_model // c.model.n_head) % 2:
    raise ConfigError(f"model.positions='rope' needs an even head dim; model.d_model / "
                      f"model.n_head = {c.model.d_model // c.model.n_head}")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def validate_scaling(c: ml_collections.ConfigDict):
  """Mixed precision, rematerialisation, gradient accumulation (the mesh is checked when built)."""
  from llmx.nn.remat import POLICIES
  require_choice(c, "model.dtype", COMPUTE_DTYPES)
  require_choice(c, "model.remat", tuple(POLICIES))
  require_positive(c, "train.grad_accum_steps")
  require_divisible(c, "train.batch_size", "train.grad_accum_steps")


def compute_dtype(c: ml_collections.ConfigDict):
  """None for float32 (no casts in the step), else the jnp dtype."""
  import jax.numpy as jnp
  return None if c.model.dtype == "float32" else jnp.dtype(c.model.dtype)


def load_tokens(c: ml_collections.ConfigDict):
  """-> (tokenizer, train tokens, val tokens); checks the splits can hold a block.

  The text is split by characters (the last val_fraction validates) before a BPE tokenizer is
  learned on the training part, so every tokenizer sees the same validation text and their
  losses per character compare.
  """
  text = corpus.load_text(c.data.path)
  tokenizer, train, val = tokenize_splits(c, text)
  for name, split in (("training", train), ("validation", val)):
    if len(split) <= c.model.block_size:
      raise ConfigError(
          f"model.block_size={c.model.block_size} is longer than the {name} split "
          f"({len(split)} tokens of data.path={c.data.path or '<embedded corpus>'!r}); "
          f"use a smaller block_size or more data")
  return tokenizer, train, val


def tokenize_splits(c: ml_collections.ConfigDict, text: str):
  """-> (tokenizer, train tokens, val tokens) of `text` under the config's tokenizer."""
  if c.data.tokenizer == "char":
    tokenizer = CharTokenizer.from_text(text)
    train, val = corpus.split_train_val(tokenizer.encode(text), c.data.val_fraction)
    return tokenizer, train, val
  train_text, val_text = corpus.split_train_val(text, c.data.val_fraction)
  if c.data.tokenizer_path:
    tokenizer = BPETokenizer.from_file(c.data.tokenizer_path)
  else:  # deterministic: a resumed run learns the same tokenizer (checked by must_match)
    tokenizer = BPETokenizer.train(train_text, c.data.vocab_size)
  return tokenizer, tokenizer.encode(train_text), tokenizer.encode(val_text)


def validation_text(c: ml_collections.ConfigDict) -> str:
  """The characters of the run's validation split."""
  return corpus.split_train_val(corpus.load_text(c.data.path), c.data.val_fraction)[1]


def tokenizer_from_json(data: dict):
  """The tokenizer stored in a checkpoint's metadata."""
  if data.get("type") == "bpe":
    return BPETokenizer.from_json(data)
  return CharTokenizer.from_json(data)


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
  m = c.model
  return GPTConfig(vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                   n_head=m.n_head, d_model=m.d_model, dropout=m.dropout, bias=m.bias,
                   tie_embeddings=m.tie_embeddings, gelu_approximate=m.gelu_approximate,
                   attention_impl=m.attention_impl or None, n_kv_head=m.n_kv_head or None,
                   positions=m.positions, rope_theta=m.rope_theta, norm=m.norm, mlp=m.mlp,
                   mlp_hidden=m.mlp_hidden or None, logits_soft_cap=m.logits_soft_cap or None,
                   attn_logits_soft_cap=m.attn_logits_soft_cap or None)


def build_model(gpt_config: GPTConfig, seed: int, remat: str = "none") -> GPT:
  return GPT(gpt_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), remat=remat)


def lm_loss(model: GPT, batch):
  """batch: int [batch, block_size + 1] windows, or packed rows [batch, 3, block_size + 1]
  (llmx.data.packing); predict each next token."""
  if batch.ndim == 3:
    inputs, targets, positions, segment_ids = split_packed(batch)
    return model.loss(inputs, targets, positions=positions, segment_ids=segment_ids)
  return model.loss(batch[:, :-1], batch[:, 1:])


def trainable(c: ml_collections.ConfigDict, gpt_config: GPTConfig):
  """The train/eval steps the config asks for (optimizer, micro-batches, compute dtype, remat).
  The model is given as a builder, so the loop creates its parameters already sharded."""
  build = functools.partial(build_model, gpt_config, c.train.seed, remat=c.model.remat)
  tx, schedule = optimizers.from_config(c.train)
  return supervised(build, tx, lm_loss, grad_accum_steps=c.train.grad_accum_steps,
                    compute_dtype=compute_dtype(c)), schedule


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del workdir
  check_batch_size(mesh, c.train.batch_size, grad_accum_steps=c.train.grad_accum_steps)
  tokenizer, train_tokens, val_tokens = load_tokens(c)
  gpt_config = model_config(c, tokenizer.vocab_size)
  steps, schedule = trainable(c, gpt_config)
  n_params = num_params(nnx.eval_shape(lambda: build_model(gpt_config, 0)), skip=("wpe",))
  log.info("model: %.2fM parameters, vocab %d, %d train / %d val tokens, %d devices in %d "
           "processes", n_params / 1e6, tokenizer.vocab_size, len(train_tokens), len(val_tokens),
           jax.device_count(), jax.process_count())
  batches = dict(block_size=c.model.block_size, batch_size=c.train.batch_size)
  # Each process loads only the rows of each global batch that its own devices hold.
  shard_index, shard_count = data_shard(mesh, c.train.batch_size)
  eval_batches = fixed_batches(val_tokens, seed=c.train.seed + 1,
                               num_batches=c.train.eval_batches, **batches)
  tokens_per_step = c.train.batch_size * c.model.block_size

  def finish(result):
    """A sample from the trained model, as nanoGPT prints one."""
    s = c.sample
    if not s.max_new_tokens or result.preempted:
      return
    model = on_every_host(result.model, mesh)
    if jax.process_index() == 0:
      out = generate(model, tokenizer.encode(s.prompt), max_new_tokens=s.max_new_tokens,
                     temperature=s.temperature, top_k=s.top_k, seed=s.seed)
      print(f"--- sample after step {result.step} ---\n{tokenizer.decode(out)}\n---", flush=True)

  return Experiment(
      trainable=steps, schedule=schedule,
      train_batches=lm_batches(train_tokens, seed=c.train.seed, **batches,
                               process_index=shard_index, process_count=shard_count),
      eval_batches=[process_rows(b, mesh) for b in eval_batches],
      meta=dict(must_match=dict(model=dataclasses.asdict(gpt_config), tokenizer=tokenizer.to_json()),
                config=c.to_dict(), n_params=n_params),
      tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * gpt.flops_per_token(gpt_config, n_params, c.model.block_size),
      finish=finish)


RECIPE = Recipe("lm", validate, experiment)


def load_run(workdir: str):
  """-> (model in eval mode, tokenizer, config, step) from the newest readable checkpoint of a
  pretrain_lm run in `workdir`."""
  model, meta, step = restore.for_inference(workdir, _trainable_from_meta)
  tokenizer = tokenizer_from_json(meta["must_match"]["tokenizer"])
  return model, tokenizer, ml_collections.ConfigDict(meta["config"]), step


def _trainable_from_meta(meta: dict):
  tx, _ = optimizers.from_config(ml_collections.ConfigDict(meta["config"]).train)
  return supervised(build_model(GPTConfig(**meta["must_match"]["model"]), seed=0), tx, lm_loss)

"""The translation recipe: the one place a translation config becomes modules (data, tokenizer,
model, optimizer, loss) and a run (`RECIPE`); restoring a run for inference."""
import dataclasses
import functools
import logging
import time

import jax
import ml_collections
from flax import nnx

from llmx.data import translation as data_lib
from llmx.families.seq2seq import evaluate, model as transformer
from llmx.families.seq2seq.model import Transformer, TransformerConfig
from llmx.nn.attention import ATTENTION_IMPLS
from llmx.nn.params import num_params
from llmx.train import optimizers, restore
from llmx.train.mesh import check_batch_size, data_shard, process_rows
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised
from llmx.train.config_check import (ConfigError, require_choice, require_divisible,
                                     require_positive, require_range)

log = logging.getLogger("llmx")

SCHEDULES = ("cosine", "rsqrt")


def validate(c: ml_collections.ConfigDict):
  """Checks every field before anything is built or compiled."""
  require_positive(c, "model.d_model", "model.n_head", "model.n_encoder_layers",
                   "model.n_decoder_layers", "model.mlp_hidden", "model.max_len",
                   "data.num_test", "data.num_val", "data.vocab_size", "data.max_train_len",
                   "train.steps", "train.tokens_per_batch", "train.eval_batches",
                   "train.log_every", "eval.beam_size", "eval.decode_batch")
  require_positive(c, "data.max_pairs", "data.bleu_val_pairs", "data.split_seed",
                   "train.warmup_steps", "train.eval_every", "train.checkpoint_every",
                   "train.seed", allow_zero=True)
  require_divisible(c, "model.d_model", "model.n_head")
  require_range(c, "model.dropout", 0.0, 1.0)
  require_range(c, "train.label_smoothing", 0.0, 1.0)
  require_range(c, "train.learning_rate", 0.0, float("inf"), low_open=True)
  require_range(c, "eval.length_penalty", 0.0, float("inf"))
  require_choice(c, "model.norm", transformer.NORMS)
  require_choice(c, "model.positions", transformer.POSITIONS)
  require_choice(c, "model.attention_impl", ATTENTION_IMPLS)
  require_choice(c, "train.schedule", SCHEDULES)
  if c.data.max_train_len > c.model.max_len:
    raise ConfigError(f"data.max_train_len={c.data.max_train_len} exceeds model.max_len="
                      f"{c.model.max_len}")
  if c.data.vocab_size < 64:
    raise ConfigError(f"data.vocab_size={c.data.vocab_size}: must be >= 64")


@dataclasses.dataclass
class Data:
  tokenizer: data_lib.SubwordTokenizer
  splits: data_lib.Splits
  train: data_lib.EncodedPairs


def load_split(c: ml_collections.ConfigDict) -> data_lib.Splits:
  """The run's fixed-seed train / val / test split of data.path."""
  pairs = data_lib.load_pairs(c.data.path)
  if c.data.max_pairs:
    pairs = pairs[:c.data.max_pairs]
  return data_lib.split_pairs(pairs, num_val=c.data.num_val, num_test=c.data.num_test,
                              seed=c.data.split_seed)


def load_data(c: ml_collections.ConfigDict) -> Data:
  """Pairs, the fixed-seed split, the tokenizer (learned on the training split: deterministic,
  so a resumed run learns the same one, which must_match checks) and the encoded training set."""
  start = time.perf_counter()
  splits = load_split(c)
  tokenizer = data_lib.SubwordTokenizer.train((s for p in splits.train for s in p),
                                              c.data.vocab_size)
  train = data_lib.encode_pairs(tokenizer, splits.train, max_len=c.data.max_train_len)
  pairs = len(splits.train) + len(splits.val) + len(splits.test)
  log.info("data: %d pairs (%d train, %d left out as longer than %d tokens; %d val; %d test), "
           "vocab %d, %.1f s", pairs, len(train.src), train.dropped, c.data.max_train_len,
           len(splits.val), len(splits.test), tokenizer.vocab_size, time.perf_counter() - start)
  return Data(tokenizer=tokenizer, splits=splits, train=train)


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
  m = c.model
  return TransformerConfig(
      vocab_size=vocab_size, max_len=m.max_len, d_model=m.d_model, n_head=m.n_head,
      n_encoder_layers=m.n_encoder_layers, n_decoder_layers=m.n_decoder_layers,
      mlp_hidden=m.mlp_hidden, dropout=m.dropout, norm=m.norm, positions=m.positions,
      share_embeddings=m.share_embeddings, tie_output=m.tie_output,
      pad_id=data_lib.SubwordTokenizer.pad_id, attention_impl=m.attention_impl or None)


def build_model(config: TransformerConfig, seed: int) -> Transformer:
  return Transformer(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def translation_loss(model: Transformer, batch, *, label_smoothing: float):
  """batch: {src, tgt_in, tgt_out} int [rows, L] (llmx.data.translation.TokenBatches)."""
  return model.loss(batch["src"], batch["tgt_in"], batch["tgt_out"],
                    label_smoothing=label_smoothing)


def loss_fn(c: ml_collections.ConfigDict):
  return functools.partial(translation_loss, label_smoothing=c.train.label_smoothing)


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  data = load_data(c)
  config = model_config(c, data.tokenizer.vocab_size)
  tx, schedule = optimizers.from_config(c.train)
  trainable = supervised(functools.partial(build_model, config, c.train.seed), tx, loss_fn(c))
  n_params = num_params(nnx.eval_shape(lambda: build_model(config, 0)))
  batches = data_lib.TokenBatches(data.train, tokens_per_batch=c.train.tokens_per_batch,
                                  max_len=c.data.max_train_len, seed=c.train.seed,
                                  row_multiple=8 * jax.device_count())
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
  return Experiment(
      trainable=trainable, schedule=schedule,
      train_batches=data_lib.train_batches(batches, process_index=shard_index,
                                           process_count=shard_count),
      eval_batches=[process_rows(b, mesh) for b in eval_batches],
      meta=dict(must_match=dict(model=dataclasses.asdict(config), tokenizer=data.tokenizer.to_json()),
                config=c.to_dict(), n_params=n_params),
      evaluate=evaluate.val_bleu_evaluator(data.tokenizer, data.splits.val[:c.data.bleu_val_pairs]),
      tokens_per_step=c.train.tokens_per_batch,
      finish=functools.partial(evaluate.report_test_bleu, c, data.tokenizer, data.splits.test,
                               workdir=workdir, n_params=n_params))


RECIPE = Recipe("seq2seq", validate, experiment)


def load_run(workdir: str):
  """-> (model in eval mode, tokenizer, config, step) from the newest readable checkpoint of a
  train_translation run in `workdir`."""
  model, meta, step = restore.for_inference(workdir, _trainable_from_meta)
  tokenizer = data_lib.SubwordTokenizer.from_json(meta["must_match"]["tokenizer"])
  return model, tokenizer, ml_collections.ConfigDict(meta["config"]), step


def _trainable_from_meta(meta: dict):
  config = ml_collections.ConfigDict(meta["config"])
  tx, _ = optimizers.from_config(config.train)
  model = build_model(TransformerConfig(**meta["must_match"]["model"]), seed=0)
  return supervised(model, tx, loss_fn(config))

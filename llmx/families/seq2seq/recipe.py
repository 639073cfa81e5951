"""The one place a translation config becomes modules: validation, data, tokenizer, model,
optimizer, loss, BLEU and restoring a run for inference."""
import dataclasses
import functools
import logging
import pathlib
import time

import ml_collections
import numpy as np
from flax import nnx

from llmx.inference import search as decoding
from llmx.data import translation as data_lib
from llmx.families.seq2seq import model as transformer
from llmx.families.seq2seq.model import Transformer, TransformerConfig
from llmx.train import optim, restore
from llmx.train.step import supervised
from llmx.train.config_check import (ConfigError, require_choice, require_divisible,
                                     require_positive, require_range)

log = logging.getLogger("llmx")

ATTENTION_IMPLS = ("", "xla", "xla_chunked", "triton", "cudnn", "mosaic_tpu")
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


def rsqrt_schedule(peak: float, warmup_steps: int):
  """The paper's schedule, scaled to reach `peak` at the end of the warm-up."""
  warmup = max(warmup_steps, 1)

  def schedule(step):
    import jax.numpy as jnp
    s = jnp.asarray(step, jnp.float32) + 1
    return peak * jnp.minimum(s / warmup, jnp.sqrt(warmup / s))
  return schedule


def build_optimizer(c: ml_collections.ConfigDict):
  t = c.train
  if t.schedule == "rsqrt":
    schedule = rsqrt_schedule(t.learning_rate, t.warmup_steps)
  else:
    schedule = optim.warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps,
                                   decay_steps=t.steps, end=t.min_learning_rate)
  tx = optim.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None)
  return tx, schedule


def translation_loss(model: Transformer, batch, *, label_smoothing: float):
  """batch: {src, tgt_in, tgt_out} int [rows, L] (llmx.data.translation.TokenBatches)."""
  return model.loss(batch["src"], batch["tgt_in"], batch["tgt_out"],
                    label_smoothing=label_smoothing)


def loss_fn(c: ml_collections.ConfigDict):
  return functools.partial(translation_loss, label_smoothing=c.train.label_smoothing)


class TranslationError(decoding.DecodingError):
  pass


def translate(model: Transformer, tokenizer: data_lib.SubwordTokenizer, sentences: list[str], *,
              beam_size: int = 4, length_penalty: float = 0.6, batch_size: int = 250,
              truncate: bool = False) -> tuple[list[str], int]:
  """English sentences -> (French sentences, number of sources truncated).

  beam_size 1 with length_penalty 0 is greedy decoding. An empty sentence raises
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
    common = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, truncate=truncate)
    if beam_size == 1 and length_penalty == 0:
      result = decoding.greedy(model, batch, **common)
    else:
      result = decoding.beam_search(model, batch, beam_size=beam_size,
                                    length_penalty=length_penalty, **common)
    truncated += result.truncated
    for i, tokens in zip(chunk, result.tokens):
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


def load_run(workdir: str):
  """-> (model in eval mode, tokenizer, config, step) from the newest readable checkpoint of a
  train_translation run in `workdir`."""
  model, meta, step = restore.for_inference(workdir, _trainable_from_meta)
  tokenizer = data_lib.SubwordTokenizer.from_json(meta["must_match"]["tokenizer"])
  return model, tokenizer, ml_collections.ConfigDict(meta["config"]), step


def _trainable_from_meta(meta: dict):
  config = ml_collections.ConfigDict(meta["config"])
  tx, _ = build_optimizer(config)
  model = build_model(TransformerConfig(**meta["must_match"]["model"]), seed=0)
  return supervised(model, tx, loss_fn(config))


def param_count(config: TransformerConfig) -> int:
  return transformer.num_params(nnx.eval_shape(lambda: build_model(config, 0)))


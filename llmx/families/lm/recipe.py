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
from llmx.nn.context import CONTEXT_ATTENTIONS, ContextParallel, layout_batch
from llmx.nn.moe import GATINGS, GROUPED
from llmx.nn.precision import MATMUL_DTYPES
from llmx.nn.params import num_params
from llmx.train import optimizers, restore
from llmx.train.mesh import (BATCH_AXES, check_batch_size, data_shard, on_every_host,
                             process_rows)
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
  validate_moe(c)
  validate_context(c)


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


def validate_moe(c: ml_collections.ConfigDict, expert_parallel: int | None = None):
  """`model.moe.*` against each other and the mesh's expert axis (`mesh.expert`, or the built
  mesh's size when given)."""
  moe = c.model.moe
  require_positive(c, "model.moe.num_experts", "model.moe.hidden", allow_zero=True)
  require_range(c, "model.moe.capacity_factor", 0.0, float("inf"))
  require_range(c, "model.moe.aux_loss_weight", 0.0, float("inf"))
  require_range(c, "model.moe.z_loss_weight", 0.0, float("inf"))
  if not moe.num_experts:
    return
  require_positive(c, "model.moe.every_n_layers")
  if not isinstance(moe.top_k, int) or not 1 <= moe.top_k <= moe.num_experts:
    raise ConfigError(f"model.moe.top_k={moe.top_k!r}: must be an integer in [1, "
                      f"model.moe.num_experts={moe.num_experts}]")
  require_choice(c, "model.moe.gating", GATINGS)
  require_choice(c, "model.moe.grouped_matmul", ("auto", *GROUPED))
  expert = expert_parallel or c.get("mesh", {}).get("expert", 1)
  if expert > 1 and moe.num_experts % expert:
    raise ConfigError(f"mesh.expert={expert} does not divide model.moe.num_experts="
                      f"{moe.num_experts}: each device must hold a whole share of the experts")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def validate_scaling(c: ml_collections.ConfigDict):
  """Mixed precision, rematerialisation, gradient accumulation (the mesh is checked when built)."""
  from llmx.nn.remat import POLICIES
  require_choice(c, "model.dtype", COMPUTE_DTYPES)
  matmul_dtype = c.model.get("matmul_dtype", "float32")  # runs saved before the field: float32
  if matmul_dtype not in MATMUL_DTYPES:
    raise ConfigError(f"model.matmul_dtype={matmul_dtype!r}: must be one of "
                      f"{', '.join(map(repr, MATMUL_DTYPES))}")
  if matmul_dtype != "float32" and c.model.dtype != "float32":
    raise ConfigError(f"model.matmul_dtype={matmul_dtype!r} with model.dtype={c.model.dtype!r}: "
                      f"rounding only the matmuls needs model.dtype='float32' (with "
                      f"model.dtype={c.model.dtype!r} every matmul already runs in it)")
  require_choice(c, "model.remat", tuple(POLICIES))
  require_positive(c, "train.grad_accum_steps")
  require_divisible(c, "train.batch_size", "train.grad_accum_steps")
  if "grad_accum_unroll" in c.train:  # runs saved before the field: False
    require_choice(c, "train.grad_accum_unroll", (False, True))


def validate_context(c: ml_collections.ConfigDict, context: int | None = None):
  """Context parallelism (`mesh.context` > 1) cuts every sequence into 2 x mesh.context chunks
  (zig-zag layout, llmx/nn/context.py). context: the mesh's resolved size (default: the
  config's, when it is a fixed size)."""
  attention = c.model.get("context_attention", "ring")  # configs from before the field: ring
  if attention not in CONTEXT_ATTENTIONS:
    raise ConfigError(f"model.context_attention={attention!r}: must be one of "
                      f"{', '.join(map(repr, CONTEXT_ATTENTIONS))}")
  if context is None:
    context = c.mesh.get("context", 1) if "mesh" in c else 1
  if isinstance(context, int) and context > 1 and c.model.block_size % (2 * context):
    raise ConfigError(
        f"model.block_size={c.model.block_size} is not divisible by 2 x mesh.context = "
        f"{2 * context}: context parallelism cuts every sequence into 2 x mesh.context chunks")


def context_parallel(c: ml_collections.ConfigDict, mesh) -> ContextParallel | None:
  """How the model splits sequences over the mesh's `context` axis; None when it is 1."""
  if mesh is None or mesh.shape.get("context", 1) == 1:
    return None
  validate_context(c, mesh.shape["context"])
  tensor = mesh.shape.get("tensor", 1) > 1
  return ContextParallel(mesh, axis="context", batch_axes=BATCH_AXES,
                         head_axis="tensor" if tensor else None,
                         attention=c.model.get("context_attention", "ring"),
                         attention_impl=c.model.attention_impl or None)


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
                   matmul_dtype=m.get("matmul_dtype", "float32"),
                   positions=m.positions, rope_theta=m.rope_theta, norm=m.norm, mlp=m.mlp,
                   mlp_hidden=m.mlp_hidden or None, logits_soft_cap=m.logits_soft_cap or None,
                   attn_logits_soft_cap=m.attn_logits_soft_cap or None,
                   moe_num_experts=m.moe.num_experts, moe_top_k=m.moe.top_k,
                   moe_every_n_layers=m.moe.every_n_layers, moe_gating=m.moe.gating,
                   moe_hidden=m.moe.hidden or None, moe_shared_expert=m.moe.shared_expert,
                   moe_capacity_factor=m.moe.capacity_factor,
                   moe_grouped_matmul=m.moe.grouped_matmul,
                   moe_aux_loss_weight=m.moe.aux_loss_weight, moe_z_loss_weight=m.moe.z_loss_weight)


def build_model(gpt_config: GPTConfig, seed: int, remat: str = "none", mesh=None) -> GPT:
  """mesh: given only to an MoE model on several devices: its MoE layers route each device's
  tokens there, and split the experts over the `expert` axis (expert parallelism)."""
  return GPT(gpt_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), remat=remat, mesh=mesh)


def lm_loss(model: GPT, batch, context: ContextParallel | None = None):
  """batch: int [batch, block_size + 1] windows, or packed rows [batch, 3, block_size + 1]
  (llmx.data.packing); predict each next token. An MoE model's loss adds the weighted balance
  and z losses, and reports `ce_loss` (the cross-entropy alone) and the MoE metrics.
  context: context parallelism: the rows go into its layout first (llmx/nn/context.py); the mean
  loss does not depend on the order of the tokens."""
  kwargs = {}
  if batch.ndim == 3:
    inputs, targets, positions, segment_ids = split_packed(batch)
    kwargs = dict(positions=positions, segment_ids=segment_ids)
  else:
    inputs, targets = batch[:, :-1], batch[:, 1:]
  if context is not None:
    inputs, targets, positions, segment_ids = layout_batch(context, inputs, targets, **kwargs)
    kwargs = dict(positions=positions, segment_ids=segment_ids, context=context)
  if not model.config.moe_num_experts:
    return model.loss(inputs, targets, **kwargs)
  loss, aux = model.loss(inputs, targets, return_aux=True, **kwargs)
  c = model.config
  total = loss + c.moe_aux_loss_weight * aux["aux_loss"] + c.moe_z_loss_weight * aux["z_loss"]
  return total, dict(ce_loss=loss, **moe_metrics(aux))


def moe_metrics(aux: dict) -> dict:
  """MoE aux values (averaged over layers) -> scalar metrics. Loads are relative to the balanced
  share 1 / num_experts (1.0 = balanced): per expert, max, min and coefficient of variation."""
  import jax.numpy as jnp
  load = aux["load"] * aux["load"].shape[0]
  out = dict(moe_aux_loss=aux["aux_loss"], moe_z_loss=aux["z_loss"], moe_dropped=aux["dropped"],
             moe_load_max=load.max(), moe_load_min=load.min(), moe_load_cv=jnp.std(load))
  out.update({f"moe_load_{e}": load[e] for e in range(load.shape[0])})
  return out


def active_params(gpt_config: GPTConfig, n_params: int) -> int:
  """Parameters one token uses: all but the experts it is not routed to."""
  c = gpt_config
  if not c.moe_num_experts:
    return n_params
  per_expert = 3 * c.d_model * (c.moe_hidden or c.hidden_size)
  moe_layers = sum(c.is_moe_layer(i) for i in range(c.n_layer))
  return n_params - moe_layers * (c.moe_num_experts - c.moe_top_k) * per_expert


def trainable(c: ml_collections.ConfigDict, gpt_config: GPTConfig, mesh=None):
  """The train/eval steps the config asks for (optimizer, micro-batches, compute dtype, remat).
  The model is given as a builder, so the loop creates its parameters already sharded. mesh: the
  run's mesh (MoE layers route per device on it and split the experts over its `expert` axis;
  its `context` axis > 1 splits the
  sequences: context parallelism)."""
  context_mesh = mesh
  if mesh is not None and (not gpt_config.moe_num_experts or mesh.size == 1):
    mesh = None  # dense or one device: keep the model independent of the mesh
  build = functools.partial(build_model, gpt_config, c.train.seed, remat=c.model.remat, mesh=mesh)
  tx, schedule = optimizers.from_config(c.train)
  context = context_parallel(c, context_mesh)
  loss_fn = lm_loss if context is None else functools.partial(lm_loss, context=context)
  return supervised(build, tx, loss_fn, grad_accum_steps=c.train.grad_accum_steps,
                    grad_accum_unroll=c.train.get("grad_accum_unroll", False),
                    compute_dtype=compute_dtype(c)), schedule


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del workdir
  check_batch_size(mesh, c.train.batch_size, grad_accum_steps=c.train.grad_accum_steps)
  tokenizer, train_tokens, val_tokens = load_tokens(c)
  gpt_config = model_config(c, tokenizer.vocab_size)
  validate_moe(c, expert_parallel=mesh.shape.get("expert", 1))
  steps, schedule = trainable(c, gpt_config, mesh)
  n_params = num_params(nnx.eval_shape(lambda: build_model(gpt_config, 0)), skip=("wpe",))
  n_active = active_params(gpt_config, n_params)
  log.info("model: %.2fM parameters (%.2fM active per token), vocab %d, %d train / %d val "
           "tokens, %d devices in %d processes", n_params / 1e6, n_active / 1e6,
           tokenizer.vocab_size, len(train_tokens), len(val_tokens), jax.device_count(),
           jax.process_count())
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
      meta=dict(must_match=dict(model=dataclasses.asdict(gpt_config), tokenizer=tokenizer.to_json(),
                                data=dict(tokens_sha256=corpus.fingerprint(train_tokens, val_tokens))),
                config=c.to_dict(), n_params=n_params),
      tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * gpt.flops_per_token(gpt_config, n_active, c.model.block_size),
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

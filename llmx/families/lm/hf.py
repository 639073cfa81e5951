"""Hugging Face GPT-2 folders <-> llmx GPT: config.json and safetensors only (no torch, no pickle).

GPT-2's Conv1D weights are stored [in, out] (y = x @ W + b), the layout of an nnx.Linear kernel,
so they are copied as they are; attn.c_attn holds q | k | v along the output axis, head by head,
as SelfAttention.qkv does. The output head is tied to wte unless config.json says
tie_word_embeddings=false; an untied lm_head is a torch Linear [vocab, d_model].
"""
import pathlib

import numpy as np
from flax import nnx

from llmx.families.lm.model import GPT, GPTConfig
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.name_map import TRANSPOSE, Entry, build_and_load, export, variable_at

ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def entries(c: GPTConfig) -> list[Entry]:
  """The name map of a GPT-2 with config c."""
  table = [Entry("transformer.wte.weight", ("wte", "embedding")),
           Entry("transformer.wpe.weight", ("wpe",)),
           Entry("transformer.ln_f.weight", ("ln_f", "scale")),
           Entry("transformer.ln_f.bias", ("ln_f", "offset"))]
  for i in range(c.n_layer):
    h, b = f"transformer.h.{i}.", ("blocks", i)
    for name, ours in (("ln_1", ("ln_1",)), ("ln_2", ("ln_2",))):
      table += [Entry(h + name + ".weight", b + ours + ("scale",)),
                Entry(h + name + ".bias", b + ours + ("offset",))]
    for name, ours in (("attn.c_attn", ("attn", "qkv")), ("attn.c_proj", ("attn", "out")),
                       ("mlp.c_fc", ("mlp", "fc")), ("mlp.c_proj", ("mlp", "proj"))):
      table += [Entry(h + name + ".weight", b + ours + ("kernel",)),
                Entry(h + name + ".bias", b + ours + ("bias",))]
  if not c.tie_embeddings:
    table.append(Entry("lm_head.weight", ("lm_head", "kernel"), TRANSPOSE))
  return table


def config_from_hf(d: dict, *, source="config.json", **overrides) -> GPTConfig:
  """A GPT-2 config.json (as a dict) -> GPTConfig; raises on options llmx does not implement."""
  if d.get("model_type", "gpt2") != "gpt2":
    raise CheckpointFormatError(f"{source}: model_type={d.get('model_type')!r}: only 'gpt2' "
                                f"checkpoints are supported")
  activation = d.get("activation_function", "gelu_new")
  unsupported = [f"{k}={d.get(k)!r}" for k, ok in (
      ("activation_function", activation in ACTIVATIONS),
      ("scale_attn_weights", d.get("scale_attn_weights", True)),
      ("scale_attn_by_inverse_layer_idx", not d.get("scale_attn_by_inverse_layer_idx", False)),
      ("add_cross_attention", not d.get("add_cross_attention", False))) if not ok]
  if unsupported:
    raise CheckpointFormatError(
        f"{source}: GPT-2 options not supported by llmx: {', '.join(unsupported)}")
  try:
    fields = dict(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
                  n_head=d["n_head"], d_model=d["n_embd"], mlp_hidden=d.get("n_inner"),
                  dropout=0.0, bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
                  gelu_approximate=ACTIVATIONS[activation],
                  layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))
  except KeyError as e:
    raise CheckpointFormatError(f"{source}: missing field {e.args[0]!r}") from None
  fields.update(overrides)
  return GPTConfig(**fields)


def config_to_hf(c: GPTConfig, *, eos_token_id: int | None = None) -> dict:
  return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
              n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
              n_inner=c.hidden_size, activation_function="gelu_new" if c.gelu_approximate else "gelu",
              layer_norm_epsilon=c.layer_norm_epsilon, tie_word_embeddings=c.tie_embeddings,
              resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              reorder_and_upcast_attn=False, dtype="float32", bos_token_id=eos_token_id,
              eos_token_id=eos_token_id)


def from_pretrained(path, *, seed: int = 0, **overrides) -> GPT:
  """Loads a Hugging Face GPT-2 folder (config.json + model.safetensors or shards) into a GPT.

  overrides: GPTConfig fields to change, e.g. dropout=0.1 for fine-tuning or attention_impl.
  Returns the model in eval mode; it answers `model(input_ids, attention_mask=mask)` with
  logits [batch, T, vocab]. Raises CheckpointFormatError naming what is wrong.
  """
  folder = hf.folder_of(path, "a GPT-2 folder")
  config = config_from_hf(hf.read_config(folder), source=folder / hf.CONFIG, **overrides)
  infos = hf.read_headers(folder)
  # Checkpoints of GPT2Model (no LM head) have no "transformer." prefix; the causal-mask buffers
  # that old transformers versions saved (attn.bias [1,1,n,n], attn.masked_bias) are not
  # weights, nor is the copy of wte that a tied head may carry.
  infos = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
           for k, v in infos.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
  if config.tie_embeddings:
    infos.pop("lm_head.weight", None)
  model = build_and_load(lambda: GPT(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1)),
                         lambda _: entries(config), infos, source=folder)
  model.eval()
  return model


def save_pretrained(model: GPT, path, *, eos_token_id: int | None = None) -> pathlib.Path:
  """Writes `model` as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
  transformers' GPT2LMHeadModel.from_pretrained loads -> the folder. A model without biases gets
  zero biases (the same function); modern options that GPT-2 cannot express are refused.
  eos_token_id: the end-of-text id (GPT-2 uses it as bos too); None writes null rather than
  GPT-2's 50256, which is outside a small vocabulary."""
  c = model.config
  modern = [f"{k}={v!r}" for k, v, ok in (
      ("positions", c.positions, c.positions == "learned"), ("norm", c.norm, c.norm == "layernorm"),
      ("mlp", c.mlp, c.mlp == "gelu"), ("n_kv_head", c.n_kv_head, c.n_kv_head in (None, c.n_head)),
      ("logits_soft_cap", c.logits_soft_cap, c.logits_soft_cap is None),
      ("attn_logits_soft_cap", c.attn_logits_soft_cap, c.attn_logits_soft_cap is None)) if not ok]
  if modern:
    raise CheckpointFormatError(f"save_pretrained writes GPT-2 checkpoints, which cannot hold "
                                f"{', '.join(modern)}")
  table = entries(c)
  present = [e for e in table if variable_at(model, e.path) is not None]
  tensors = export(model, present, dtype=np.float32)
  for e in table:
    if variable_at(model, e.path) is None:
      # bias=False: GPT-2 always has biases and norm offsets; zeros compute the same function.
      owner = variable_at(model, e.path[:-1])
      shape = owner.scale.shape if e.path[-1] == "offset" else owner.kernel.shape[1:]
      tensors[e.hf[0]] = np.zeros(shape, np.float32)
  return hf.write_checkpoint(path, tensors, config_to_hf(c, eos_token_id=eos_token_id))

"""Llama-family checkpoints <-> llmx GPT: Hugging Face folders of LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM (config.json + safetensors) and GGUF files of the
`llama` and `qwen2` architectures (llama.cpp).

The decoder LM with positions="rope", norm="rmsnorm", mlp="swiglu", no biases (Qwen2: q/k/v
biases) is a Llama. Two layout facts make the tables below:
- torch.nn.Linear stores [out, in]; nnx kernels are [in, out]. q, k, v are fused into one qkv
  kernel [d_model, (n_head + 2 n_kv) * head_dim] and gate, up into one gate_up kernel.
- llama.cpp's converter permutes the rows of q and k within each head (`llama` architecture;
  `qwen2` keeps Hugging Face's order) so that RoPE rotates adjacent pairs: GGUF row
  h*hd + 2j + a holds HF row h*hd + a*hd/2 + j. `_unpermute` undoes it, so both formats run the
  same "rotate half" RoPE (../shared/reference/smollm2.md).
"""
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.families.lm.model import GPT, GPTConfig
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.gguf import GGUFFile
from llmx.formats.name_map import (TRANSPOSE, Entry, Transform, check_finite, concat, export, load,
                                    variable_at)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
GGUF_ARCHITECTURES = ("llama", "qwen2")
ROPE_SCALINGS = ("llama3", "linear")


# ------------------------------------------------------------------------------------ configs

def config_from_hf(d: dict, *, source="config.json", **overrides) -> GPTConfig:
  """config.json of a Llama, Mistral or Qwen2 causal LM -> GPTConfig; refuses what llmx does
  not implement, naming the field."""
  arch = (d.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise CheckpointFormatError(f"{source}: architectures={d.get('architectures')!r}: supported "
                                f"are {', '.join(ARCHITECTURES)}")
  arch = ARCHITECTURES[arch]  # "llama", "mistral" or "qwen2": the checks below use the model type
  # transformers >= 5 writes rope_theta and the scaling inside one rope_parameters dict.
  rope = d.get("rope_parameters") or {}
  try:
    d_model, n_head = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or d_model // n_head
    unsupported = [f"{k}={v!r}" for k, v, ok in (
        ("hidden_act", d.get("hidden_act", "silu"), d.get("hidden_act", "silu") == "silu"),
        ("head_dim", head_dim, head_dim * n_head == d_model),
        ("mlp_bias", d.get("mlp_bias"), not d.get("mlp_bias")),
        ("attention_bias", d.get("attention_bias"), not d.get("attention_bias")),
        ("sliding_window", d.get("sliding_window"), not d.get("use_sliding_window", arch == "mistral")
         or not d.get("sliding_window") or d["sliding_window"] >= d["max_position_embeddings"]),
    ) if not ok]
    if unsupported:
      raise CheckpointFormatError(f"{source}: options not supported by llmx: {', '.join(unsupported)}")
    fields = dict(
        vocab_size=d["vocab_size"], block_size=d["max_position_embeddings"],
        n_layer=d["num_hidden_layers"], n_head=n_head, d_model=d_model,
        n_kv_head=d.get("num_key_value_heads") or n_head, mlp_hidden=d["intermediate_size"],
        dropout=0.0, bias=False, qkv_bias=arch == "qwen2", positions="rope",
        rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))), norm="rmsnorm",
        mlp="swiglu", layer_norm_epsilon=float(d.get("rms_norm_eps", 1e-6)),
        # transformers' LlamaConfig, MistralConfig and Qwen2Config all default to an untied head.
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_scaling=_rope_scaling(d.get("rope_scaling") or rope, source))
  except KeyError as e:
    raise CheckpointFormatError(f"{source}: missing field {e.args[0]!r}") from None
  fields.update(overrides)
  return GPTConfig(**fields)


def _rope_scaling(s: dict | None, source) -> tuple | None:
  if not s:
    return None
  kind = s.get("rope_type", s.get("type"))
  if kind in (None, "default"):
    return None
  if kind not in ROPE_SCALINGS:
    raise CheckpointFormatError(f"{source}: rope_scaling type {kind!r} is not supported; supported: "
                                f"{', '.join(ROPE_SCALINGS)}")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  needed = keys if kind == "llama3" else keys[:1]
  if any(k not in s for k in needed):
    raise CheckpointFormatError(f"{source}: rope_scaling of type {kind!r} needs "
                                f"{', '.join(needed)}; got {s}")
  return (("rope_type", kind),) + tuple((k, s[k]) for k in keys if k in s)


def config_to_hf(c: GPTConfig, *, bos_token_id=None, eos_token_id=None) -> dict:
  """GPTConfig -> config.json of the matching transformers class (Qwen2 when q/k/v have biases)."""
  qwen = bool(c.qkv_bias)
  out = dict(architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
             model_type="qwen2" if qwen else "llama", vocab_size=c.vocab_size,
             hidden_size=c.d_model, intermediate_size=c.hidden_size,
             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
             num_key_value_heads=c.n_kv_head or c.n_head, head_dim=c.d_model // c.n_head,
             max_position_embeddings=c.block_size, rms_norm_eps=c.layer_norm_epsilon,
             rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, hidden_act="silu",
             attention_bias=False, mlp_bias=False, torch_dtype="float32",
             bos_token_id=bos_token_id, eos_token_id=eos_token_id,
             rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None)
  if qwen:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def check_llama(c: GPTConfig):
  """Refuses a GPTConfig that a Llama-family checkpoint cannot hold."""
  wrong = [f"{k}={v!r}" for k, v, ok in (
      ("positions", c.positions, c.positions == "rope"), ("norm", c.norm, c.norm == "rmsnorm"),
      ("mlp", c.mlp, c.mlp == "swiglu"), ("bias", c.bias, not c.bias),
      ("logits_soft_cap", c.logits_soft_cap, c.logits_soft_cap is None),
      ("attn_logits_soft_cap", c.attn_logits_soft_cap, c.attn_logits_soft_cap is None)) if not ok]
  if wrong:
    raise CheckpointFormatError(f"a Llama-family checkpoint cannot hold {', '.join(wrong)}")


# ---------------------------------------------------------------------------------- name maps

def _sizes(c: GPTConfig):
  hd = c.d_model // c.n_head
  return hd, c.n_head * hd, (c.n_kv_head or c.n_head) * hd


def hf_entries(c: GPTConfig) -> list[Entry]:
  """The name map of a Hugging Face Llama / Mistral / Qwen2 with config c."""
  _, q, kv = _sizes(c)
  table = [Entry("model.embed_tokens.weight", ("wte", "embedding")),
           Entry("model.norm.weight", ("ln_f", "scale"))]
  for i in range(c.n_layer):
    h, b = f"model.layers.{i}.", ("blocks", i)
    table += [
        Entry(h + "input_layernorm.weight", b + ("ln_1", "scale")),
        Entry(h + "post_attention_layernorm.weight", b + ("ln_2", "scale")),
        Entry([h + f"self_attn.{p}_proj.weight" for p in "qkv"], b + ("attn", "qkv", "kernel"),
              concat((q, kv, kv), transpose=True)),
        Entry(h + "self_attn.o_proj.weight", b + ("attn", "out", "kernel"), TRANSPOSE),
        Entry([h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
              b + ("mlp", "gate_up", "kernel"), concat(2, transpose=True)),
        Entry(h + "mlp.down_proj.weight", b + ("mlp", "down", "kernel"), TRANSPOSE)]
    if c.qkv_bias:
      table.append(Entry([h + f"self_attn.{p}_proj.bias" for p in "qkv"],
                         b + ("attn", "qkv", "bias"), concat((q, kv, kv))))
  if not c.tie_embeddings:
    table.append(Entry("lm_head.weight", ("lm_head", "kernel"), TRANSPOSE))
  return table


def _unpermute(w, heads: int):
  """GGUF q/k rows (adjacent RoPE pairs) -> HF rows (halves); w: [heads * hd, ...]."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w, heads: int):
  """HF q/k rows -> GGUF rows: the inverse of _unpermute."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_qkv(c: GPTConfig, *, bias: bool, permuted: bool = True) -> Transform:
  """q, k, v as stored in GGUF ([out, in], q and k rows permuted unless not `permuted`) <-> the
  fused qkv variable."""
  _, q, kv = _sizes(c)
  n_kv = c.n_kv_head or c.n_head
  flip = (lambda x: x) if bias else (lambda x: x.T)
  if not permuted:
    return concat((q, kv, kv), transpose=not bias)
  to_model = lambda wq, wk, wv: jnp.concatenate(
      [flip(_unpermute(wq, c.n_head)), flip(_unpermute(wk, n_kv)), flip(wv)], axis=-1)

  def to_hf(x):
    wq, wk, wv = jnp.split(x, [q, q + kv], axis=-1)
    return _permute(flip(wq), c.n_head), _permute(flip(wk), n_kv), flip(wv)
  return Transform(to_model, to_hf)


def gguf_entries(c: GPTConfig, arch: str = "llama") -> list[Entry]:
  """The name map of a llama.cpp GGUF (`llama` or `qwen2` architecture) with config c. Only
  `llama` permutes q/k rows: llama.cpp runs `qwen2` with NeoX ("rotate half") RoPE, so its
  converter stores Qwen2's q and k as Hugging Face does."""
  permuted = arch == "llama"
  table = [Entry("token_embd.weight", ("wte", "embedding")),
           Entry("output_norm.weight", ("ln_f", "scale"))]
  for i in range(c.n_layer):
    h, b = f"blk.{i}.", ("blocks", i)
    table += [
        Entry(h + "attn_norm.weight", b + ("ln_1", "scale")),
        Entry(h + "ffn_norm.weight", b + ("ln_2", "scale")),
        Entry([h + f"attn_{p}.weight" for p in "qkv"], b + ("attn", "qkv", "kernel"),
              _gguf_qkv(c, bias=False, permuted=permuted)),
        Entry(h + "attn_output.weight", b + ("attn", "out", "kernel"), TRANSPOSE),
        Entry([h + "ffn_gate.weight", h + "ffn_up.weight"], b + ("mlp", "gate_up", "kernel"),
              concat(2, transpose=True)),
        Entry(h + "ffn_down.weight", b + ("mlp", "down", "kernel"), TRANSPOSE)]
    if c.qkv_bias:
      table.append(Entry([h + f"attn_{p}.bias" for p in "qkv"], b + ("attn", "qkv", "bias"),
                         _gguf_qkv(c, bias=True, permuted=permuted)))
  if not c.tie_embeddings:
    table.append(Entry("output.weight", ("lm_head", "kernel"), TRANSPOSE))
  return table


def config_from_gguf(f: GGUFFile, **overrides) -> GPTConfig:
  """The hyperparameters in a GGUF file's metadata -> GPTConfig."""
  if f.architecture not in GGUF_ARCHITECTURES:
    raise CheckpointFormatError(f"{f.path}: general.architecture={f.architecture!r} is not "
                                f"supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
  if "rope_freqs.weight" in f.tensor_names:
    raise CheckpointFormatError(f"{f.path}: per-frequency RoPE factors (rope_freqs.weight, Llama "
                                f"3.1 scaling in GGUF) are not supported; load the Hugging Face folder")
  d_model, n_head = f.require("{arch}.embedding_length"), f.require("{arch}.attention.head_count")
  rope_dim = f.get("{arch}.rope.dimension_count", d_model // n_head)
  if rope_dim != d_model // n_head:
    raise CheckpointFormatError(f"{f.path}: RoPE over {rope_dim} of {d_model // n_head} head "
                                f"dimensions (partial rotary) is not supported")
  scaling = f.get("{arch}.rope.scaling.type")
  if scaling not in (None, "none", "linear"):
    raise CheckpointFormatError(f"{f.path}: rope scaling {scaling!r} is not supported")
  fields = dict(
      vocab_size=len(f.require("tokenizer.ggml.tokens")),
      block_size=f.require("{arch}.context_length"), n_layer=f.require("{arch}.block_count"),
      n_head=n_head, d_model=d_model, n_kv_head=f.get("{arch}.attention.head_count_kv", n_head),
      mlp_hidden=f.require("{arch}.feed_forward_length"), dropout=0.0, bias=False,
      qkv_bias="blk.0.attn_q.bias" in f.tensor_names, positions="rope",
      rope_theta=float(f.get("{arch}.rope.freq_base", 10000.0)), norm="rmsnorm", mlp="swiglu",
      layer_norm_epsilon=float(f.require("{arch}.attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in f.tensor_names,
      rope_scaling=((("rope_type", "linear"), ("factor", float(f.require("{arch}.rope.scaling.factor"))))
                    if scaling == "linear" else None))
  fields.update(overrides)
  return GPTConfig(**fields)


# ------------------------------------------------------------------------------ load and save

def from_folder(path, *, seed: int = 0, **overrides) -> GPT:
  """A Hugging Face Llama / Mistral / Qwen2 folder -> GPT in eval mode (float32 params). Every
  shape is checked against the safetensors headers before the model is built."""
  folder = hf.folder_of(path, "a Hugging Face Llama-family folder")
  config = config_from_hf(hf.read_config(folder), source=folder / hf.CONFIG, **overrides)
  infos = {k: v for k, v in hf.read_headers(folder).items() if not k.endswith("rotary_emb.inv_freq")}
  if config.tie_embeddings:
    infos.pop("lm_head.weight", None)
  problems = _shape_problems(lambda: nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(seed))),
                             hf_entries(config), {k: v.shape for k, v in infos.items()})
  if problems:
    raise CheckpointFormatError(f"{folder} does not match its config.json: {problems}")
  model = GPT(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  load(model, hf_entries(config), infos, source=folder)
  model.eval()
  return model


def from_gguf(f: GGUFFile, *, seed: int = 0, **overrides) -> GPT:
  """A llama.cpp GGUF file -> GPT in eval mode, its tensors dequantized to float32."""
  config = config_from_gguf(f, **overrides)
  table = gguf_entries(config, f.architecture)
  shapes = {name: f.shape(name) for name in f.tensor_names}
  problems = _shape_problems(lambda: nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(seed))),
                             table, shapes)
  if problems:
    raise CheckpointFormatError(f"{f.path} does not match its own metadata: {problems}")
  model = GPT(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  for e in table:
    variable = variable_at(model, e.path)
    tensors = [f.tensor(n) for n in e.hf]
    for name, tensor in zip(e.hf, tensors):
      check_finite(tensor, name, f.path)
    variable[...] = jnp.asarray(e.transform.to_model(*tensors), variable.dtype)
  model.eval()
  return model


def _shape_problems(abstract_model, table, shapes: dict) -> str:
  """Missing, unexpected and mis-shaped tensors, from shapes alone ("" when all fit).
  abstract_model: makes the model with jax.eval_shape, only once every name is present (tracing
  the model takes seconds when a config.json claims hundreds of layers that the files lack)."""
  from llmx.formats.name_map import expected_shapes
  used = [n for e in table for n in e.hf]
  missing = [n for n in used if n not in shapes]
  unexpected = sorted(set(shapes) - set(used))
  model = None if missing or unexpected else abstract_model()
  wrong = [] if model is None else [
      f"{n}: {shapes[n]}, expected {want}" for e in table
      for n, want in zip(e.hf, expected_shapes(model, e)) if tuple(shapes[n]) != tuple(want)]
  parts = [f"{kind} ({len(v)}): {', '.join(v[:8])}{', ...' if len(v) > 8 else ''}"
           for kind, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if v]
  return "; ".join(parts)


def save_folder(model: GPT, path, *, bos_token_id=None, eos_token_id=None) -> pathlib.Path:
  """Writes `model` as a Hugging Face Llama (or Qwen2, with q/k/v biases) folder that
  transformers and llmx load -> the folder. Float32 weights."""
  c = model.config
  check_llama(c)
  tensors = export(model, hf_entries(c), dtype=np.float32)
  return hf.write_checkpoint(path, tensors, config_to_hf(c, bos_token_id=bos_token_id,
                                                        eos_token_id=eos_token_id))

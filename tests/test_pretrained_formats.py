"""Pretrained checkpoint formats on tiny synthetic models: Hugging Face folders that llmx writes
(Qwen2- and Llama-3-style, single file and sharded, float32 and bfloat16), llama.cpp GGUF files
written with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1; `llama` and `qwen2`
architectures), and the one-line errors for what llmx refuses.

The weights are random (norm scales and biases too, so that a swapped or dropped tensor shows),
and the reference is an independent float64 numpy forward written from the Hugging Face
layout (../shared/reference/smollm2.md): a round trip through llmx alone could not tell a
layout that llmx writes and reads back consistently from the one transformers expects.
"""
import dataclasses
import json
import math
import shutil
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

from llmx import pretrained
from llmx.errors import LlmxError
from llmx.families.lm.model import GPT, GPTConfig
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.chat_template import ChatTemplateError
from llmx.formats.safetensors import read_file, read_header
from llmx.formats.tokenizer import PretrainedTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with the BOS variable, so that the template's variables are checked too.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                 "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
          "def add(a, b):\n    return a + b\n", "Numbers: 12345 and 678.",
          "the theory of the thing is that these three then thought"] * 20
TEXTS = ["Hello world", "the lazy fox, 2024!", "<|im_start|>user\nhi<|im_end|>\n",
         "ünïcödé ☃"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there?"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "The fox?"}]
IDS = np.array([[5, 17, 250, 99, 3, 42, 7, 180, 11, 64, 2, 33]], np.int32)


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def bpe():
  """A byte-level BPE (~300 tokens, three special tokens first) trained on a few sentences."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  assert 280 <= tok.get_vocab_size() <= 300 and tok.token_to_id("<|im_end|>") == 2
  return tok


@pytest.fixture(scope="module")
def tokenizer(bpe):
  return PretrainedTokenizer(bpe, chat_template=CHAT_TEMPLATE, bos_token="<|im_start|>",
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")


def randomize(model: GPT, seed: int) -> GPT:
  """Every parameter random: norm scales around 1, biases and matrices of a size that makes the
  logits move by O(1) when any tensor is misplaced."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1 + 0.5 * rng.standard_normal(x.shape), x.dtype)
    std = 0.5 if "bias" in name else 1 / math.sqrt(x.shape[0])
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)
  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))
  return model


def rope_inv_freq(hd: int, theta: float, scaling: dict | None) -> np.ndarray:
  """transformers' rotary frequencies (default, linear and llama3), in float64."""
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return inv


def reference_logits(w: dict, config: dict, ids) -> np.ndarray:
  """A Llama / Qwen2 forward in float64 from HF-named [out, in] weights and config.json:
  rotate-half RoPE, query head i reads KV head i // group, RMSNorm times w."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  d, nh = config["hidden_size"], config["num_attention_heads"]
  nkv, hd, eps = config["num_key_value_heads"], d // nh, config["rms_norm_eps"]
  rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
  inv = rope_inv_freq(hd, config["rope_theta"], config.get("rope_scaling"))
  out = []
  for row in np.asarray(ids):
    T = len(row)
    angles = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    rope = lambda x: np.concatenate([x[..., :hd // 2] * cos - x[..., hd // 2:] * sin,
                                     x[..., hd // 2:] * cos + x[..., :hd // 2] * sin], -1)
    x = w["model.embed_tokens.weight"][row]
    for i in range(config["num_hidden_layers"]):
      p = f"model.layers.{i}."
      h = rms(x, w[p + "input_layernorm.weight"])
      proj = lambda n: (h @ w[p + f"self_attn.{n}_proj.weight"].T
                        + w.get(p + f"self_attn.{n}_proj.bias", 0))
      q = rope(proj("q").reshape(T, nh, hd))
      k = np.repeat(rope(proj("k").reshape(T, nkv, hd)), nh // nkv, axis=1)
      v = np.repeat(proj("v").reshape(T, nkv, hd), nh // nkv, axis=1)
      s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
      a = np.exp(s - s.max(-1, keepdims=True))
      o = np.einsum("hqk,khd->qhd", a / a.sum(-1, keepdims=True), v).reshape(T, d)
      x = x + o @ w[p + "self_attn.o_proj.weight"].T
      h = rms(x, w[p + "post_attention_layernorm.weight"])
      g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
      x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    out.append(rms(x, w["model.norm.weight"]) @ head.T)
  return np.stack(out)


def logits(model, ids=IDS) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids)), np.float64)


def one_line_error(excinfo, *names):
  """The error is one line and names each of `names` (a file, a field, a value)."""
  text = str(excinfo.value)
  assert "\n" not in text, text
  for name in names:
    assert str(name) in text, (name, text)


# ------------------------------------------------------------------ Hugging Face round trips

# One set of shapes for every model here (vocab = the BPE's 300 tokens), so that JAX compiles
# each eager op once; rows of 32 and 64 values are whole GGUF quantization blocks.
SHAPES = dict(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
              mlp_hidden=64, bias=False, positions="rope", norm="rmsnorm", mlp="swiglu")
QWEN2 = GPTConfig(**SHAPES, qkv_bias=True, rope_theta=1e6, layer_norm_epsilon=1e-6,
                  tie_embeddings=True)
# With head_dim 8 and theta 1e4 the RoPE wavelengths are 6, 63, 628 and 6283 positions:
# original_max_position_embeddings=128 with high/low factors 8/1 keeps the first (< 16), blends
# the second and slows the last two by `factor` (> 128), the three llama3 regimes.
LLAMA3_SCALING = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                  ("high_freq_factor", 8.0), ("original_max_position_embeddings", 128))
LLAMA3 = GPTConfig(**SHAPES, qkv_bias=False, rope_theta=1e4, layer_norm_epsilon=1e-5,
                   tie_embeddings=False, rope_scaling=LLAMA3_SCALING)
LINEAR = dataclasses.replace(LLAMA3, rope_scaling=(("rope_type", "linear"), ("factor", 4.0)))
STYLES = {"qwen2": QWEN2, "llama3": LLAMA3, "linear": LINEAR}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
  """style -> (random model, the folder pretrained.save wrote)."""
  out = {}
  for i, (style, config) in enumerate(STYLES.items()):
    model = randomize(GPT(config, rngs=nnx.Rngs(i)), seed=i)
    model.eval()
    out[style] = model, pretrained.save(model, tokenizer, tmp_path_factory.mktemp(style))
  return out


@pytest.mark.parametrize("style", STYLES)
def test_hf_round_trip_gives_identical_logits_and_tokenizer(saved, tokenizer, style):
  model, folder = saved[style]
  loaded, tok = pretrained.load(folder)
  assert loaded.config == model.config
  assert np.array_equal(logits(loaded), logits(model))
  for text in TEXTS:
    assert tok.encode(text).tolist() == tokenizer.encode(text).tolist(), text
  assert tok.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)
  assert tok.apply_chat_template(CHAT).startswith("<|im_start|><|im_start|>system\nBe brief.")
  assert np.array_equal(tok.apply_chat_template(CHAT, tokenize=True),
                        tokenizer.apply_chat_template(CHAT, tokenize=True))
  assert (tok.eos_token_ids, tok.pad_id, tok.bos_token) == (
      tokenizer.eos_token_ids, tokenizer.pad_id, tokenizer.bos_token) == ((2,), 0, "<|im_start|>")
  assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


@pytest.mark.parametrize("style", STYLES)
def test_hf_export_is_the_transformers_layout(saved, style):
  """The written tensors, run by the independent forward with the written config.json, give
  llmx's logits: names, [out, in] orientation, q/k/v split, gate/up order and RoPE scaling are
  those transformers reads."""
  model, folder = saved[style]
  config = json.loads((folder / "config.json").read_text())
  weights = dict(read_file(folder / "model.safetensors"))
  want = reference_logits(weights, config, IDS)
  assert np.abs(logits(model) - want).max() <= 1e-5 * np.abs(want).max()


def test_config_json_fields_are_what_transformers_expects(saved):
  qwen = json.loads((saved["qwen2"][1] / "config.json").read_text())
  assert qwen["architectures"] == ["Qwen2ForCausalLM"] and qwen["model_type"] == "qwen2"
  assert (qwen["num_attention_heads"], qwen["num_key_value_heads"], qwen["hidden_size"],
          qwen["intermediate_size"], qwen["num_hidden_layers"], qwen["vocab_size"]) == (
              4, 2, 32, 64, 2, 300)
  assert qwen["tie_word_embeddings"] is True and qwen["rope_theta"] == 1e6
  assert qwen["rms_norm_eps"] == 1e-6 and qwen["hidden_act"] == "silu"
  assert qwen["rope_scaling"] is None and qwen["use_sliding_window"] is False
  names = set(read_file(saved["qwen2"][1] / "model.safetensors"))
  assert "model.layers.1.self_attn.k_proj.bias" in names and "lm_head.weight" not in names

  llama3 = json.loads((saved["llama3"][1] / "config.json").read_text())
  assert llama3["architectures"] == ["LlamaForCausalLM"] and llama3["model_type"] == "llama"
  assert llama3["num_key_value_heads"] == 2 and llama3["tie_word_embeddings"] is False
  assert llama3["rope_scaling"] == {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
      "original_max_position_embeddings": 128}
  assert llama3["attention_bias"] is False and llama3["vocab_size"] == 300
  assert (llama3["bos_token_id"], llama3["eos_token_id"]) == (1, 2)
  names = set(read_file(saved["llama3"][1] / "model.safetensors"))
  assert "lm_head.weight" in names and not any(n.endswith(".bias") for n in names)
  linear = json.loads((saved["linear"][1] / "config.json").read_text())
  assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  generation = json.loads((saved["llama3"][1] / "generation_config.json").read_text())
  assert [generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [1, 2, 0]
  tok_config = json.loads((saved["llama3"][1] / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == CHAT_TEMPLATE and tok_config["eos_token"] == "<|im_end|>"


def test_rope_scaling_changes_the_logits(saved):
  """The scaled models differ from the same weights without scaling, so the round trips above
  would have caught a rope_scaling lost on the way."""
  model, _ = saved["llama3"]
  plain = GPT(dataclasses.replace(LLAMA3, rope_scaling=None), rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(model, nnx.Param))
  plain.eval()
  assert np.abs(logits(plain) - logits(model)).max() > 1e-2


def test_sharded_folder_loads_identically(saved, tmp_path):
  model, folder = saved["llama3"]
  tensors = {k: np.array(v) for k, v in read_file(folder / "model.safetensors").items()}
  config = json.loads((folder / "config.json").read_text())
  hf.write_checkpoint(tmp_path, tensors, config, max_shard_bytes=40_000)
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(folder / name, tmp_path / name)
  index = json.loads((tmp_path / hf.INDEX).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 3 and not (tmp_path / hf.SINGLE).exists()
  loaded, _ = pretrained.load(tmp_path)
  assert np.array_equal(logits(loaded), logits(model))


def test_bfloat16_load(saved):
  model, folder = saved["llama3"]
  loaded, _ = pretrained.load(folder, dtype="bfloat16")
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(loaded, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  got, want = logits(loaded), logits(model)
  # bf16 keeps 8 mantissa bits: ~1% per weight, a few % of the logits' range after 2 layers.
  assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
  assert np.abs(got - want).max() > 0  # it did compute in bf16


def test_config_json_as_transformers_5_writes_it(saved, tmp_path):
  """transformers >= 5 saves rope_theta and the scaling inside `rope_parameters`, and leaves out
  fields equal to the class default (tie_word_embeddings=False for Llama and Qwen2)."""
  for style in ("qwen2", "llama3"):
    model, folder = saved[style]
    copy = tmp_path / style
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    rope = dict(config.pop("rope_scaling") or {"rope_type": "default"},
                rope_theta=config.pop("rope_theta"))
    if not config["tie_word_embeddings"]:
      del config["tie_word_embeddings"]
    (copy / "config.json").write_text(json.dumps(dict(config, rope_parameters=rope)))
    loaded, _ = pretrained.load(copy)
    assert loaded.config == model.config, style
    assert np.array_equal(logits(loaded), logits(model)), style


# ----------------------------------------------------------------------------------- GGUF files

# HF layer tensor -> llama.cpp's name (gguf-py's tensor_mapping), written out here on purpose.
GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf_name: str) -> str:
  if hf_name.startswith("model.layers."):
    i, rest = hf_name[len("model.layers."):].split(".", 1)
    return f"blk.{i}.{GGUF_NAMES[rest]}"
  return {"model.embed_tokens.weight": "token_embd.weight",
          "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[hf_name]


def hf_config(config: GPTConfig) -> dict:
  """The config.json fields the reference forward reads."""
  return dict(hidden_size=config.d_model, num_attention_heads=config.n_head,
              num_key_value_heads=config.n_kv_head, num_hidden_layers=config.n_layer,
              rms_norm_eps=config.layer_norm_epsilon, rope_theta=config.rope_theta,
              rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None)


def random_weights(config: GPTConfig, seed: int) -> dict:
  """HF-named [out, in] float32 weights drawn here, not by llmx."""
  rng = np.random.default_rng(seed)
  c, hd = config, config.d_model // config.n_head
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.d_model),
            "model.norm.weight": (c.d_model,)}
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
  for i in range(c.n_layer):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (c.d_model,),
                   p + "post_attention_layernorm.weight": (c.d_model,),
                   p + "self_attn.q_proj.weight": (c.n_head * hd, c.d_model),
                   p + "self_attn.k_proj.weight": (c.n_kv_head * hd, c.d_model),
                   p + "self_attn.v_proj.weight": (c.n_kv_head * hd, c.d_model),
                   p + "self_attn.o_proj.weight": (c.d_model, c.d_model),
                   p + "mlp.gate_proj.weight": (c.mlp_hidden, c.d_model),
                   p + "mlp.up_proj.weight": (c.mlp_hidden, c.d_model),
                   p + "mlp.down_proj.weight": (c.d_model, c.mlp_hidden)})
    if c.qkv_bias:
      shapes.update({p + f"self_attn.{n}_proj.bias": (shapes[p + f"self_attn.{n}_proj.weight"][0],)
                     for n in "qkv"})
  def draw(name, shape):
    if name.endswith("norm.weight"):
      return 1 + 0.5 * rng.standard_normal(shape)
    std = 0.5 if name.endswith(".bias") else 1 / math.sqrt(shape[-1])
    return std * rng.standard_normal(shape)
  return {name: draw(name, shape).astype(np.float32) for name, shape in shapes.items()}


def llama_cpp_permute(w, heads: int):
  """convert_hf_to_gguf.py's LlamaModel.permute: within each head, HF row a*hd/2 + j goes to
  row 2j + a, so that llama.cpp's RoPE rotates adjacent pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_unpermute(w, heads: int):
  """transformers' reverse permutation (../shared/reference/smollm2.md)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_vocab(bpe):
  tokens = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
  merges = [" ".join(m) if isinstance(m, list) else m  # tokenizers >= 0.20 writes pairs
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  return tokens, [3 if t in SPECIALS else 1 for t in tokens], merges


def write_gguf(path, arch: str, config: GPTConfig, weights: dict, bpe, *, types=None,
               tokenizer_model="gpt2") -> dict:
  """A GGUF file as llama.cpp's converter writes it: metadata, tokenizer, q/k rows permuted for
  the `llama` architecture (not `qwen2`), 2-D tensors in types[kind] (kind: the GGUF name
  without blk.N., or "*"), 1-D ones in F32. -> the weights as the file holds them, dequantized
  and back in HF order: what a correct loader must compute with."""
  types = types or {}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.n_layer)
  w.add_context_length(config.block_size)
  w.add_embedding_length(config.d_model)
  w.add_feed_forward_length(config.mlp_hidden)
  w.add_head_count(config.n_head)
  w.add_head_count_kv(config.n_kv_head)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
  if config.rope_scaling:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(dict(config.rope_scaling)["factor"])
  tokens, token_types, merges = gguf_vocab(bpe)
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types(token_types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_chat_template(CHAT_TEMPLATE)
  held = {}
  for name, x in weights.items():
    heads = {"q_proj": config.n_head, "k_proj": config.n_kv_head}.get(name.split(".")[-2])
    if heads and arch == "llama":
      x = llama_cpp_permute(x, heads)
    kind = gguf_name(name).split(".", 2)[-1] if name.startswith("model.layers") else gguf_name(name)
    qtype = types.get(kind, types.get("*", Q.F32)) if x.ndim == 2 else Q.F32
    data = gguf.quants.quantize(x, qtype)
    w.add_tensor(gguf_name(name), data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    value = gguf.quants.dequantize(data, qtype).reshape(x.shape).astype(np.float32)
    held[name] = reference_unpermute(value, heads) if heads and arch == "llama" else value
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


TOLERANCE = 1e-5  # of the logits' scale: float32 against the float64 forward, same weights


def check_gguf_model(path, config, held, bpe, tokenizer):
  model, tok = pretrained.load(path)
  assert model.config.n_kv_head == config.n_kv_head and model.config.qkv_bias == config.qkv_bias
  assert model.config.tie_embeddings == config.tie_embeddings
  assert model.config.rope_theta == config.rope_theta
  assert model.config.rope_scaling == config.rope_scaling
  want = reference_logits(held, hf_config(config), IDS)
  assert np.abs(logits(model) - want).max() <= TOLERANCE * np.abs(want).max()
  for text in TEXTS:
    assert tok.encode(text).tolist() == bpe.encode(text).ids, text
  assert tok.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)
  assert (tok.eos_token_ids, tok.pad_id, tok.bos_token) == ((2,), 0, "<|im_start|>")
  return model, want


# The six tensor types, mixed in one file (and each alone below).
MIXED = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1,
         "attn_v.weight": Q.BF16, "attn_output.weight": Q.F16, "ffn_gate.weight": Q.Q4_1,
         "ffn_up.weight": Q.Q8_0, "ffn_down.weight": Q.Q4_0, "output.weight": Q.BF16}
GGUF_LLAMA = dataclasses.replace(LLAMA3, rope_scaling=(("rope_type", "linear"), ("factor", 2.0)))


def test_gguf_llama_mixed_types_untied_head(tmp_path, bpe, tokenizer):
  weights = random_weights(GGUF_LLAMA, seed=10)
  held = write_gguf(tmp_path / "llama.gguf", "llama", GGUF_LLAMA, weights, bpe, types=MIXED)
  reader = gguf.GGUFReader(tmp_path / "llama.gguf")
  assert {t.tensor_type.name for t in reader.tensors} == {
      "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
  _, want = check_gguf_model(tmp_path / "llama.gguf", GGUF_LLAMA, held, bpe, tokenizer)
  # The check has teeth: the q/k rows left in llama.cpp's order move the logits by O(1).
  scrambled = dict(held)
  for i in range(GGUF_LLAMA.n_layer):
    for n, heads in (("q", GGUF_LLAMA.n_head), ("k", GGUF_LLAMA.n_kv_head)):
      name = f"model.layers.{i}.self_attn.{n}_proj.weight"
      scrambled[name] = llama_cpp_permute(held[name], heads)
  wrong = reference_logits(scrambled, hf_config(GGUF_LLAMA), IDS)
  assert np.abs(wrong - want).max() > 1e3 * TOLERANCE * np.abs(want).max()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1],
                         ids=lambda q: q.name)
def test_gguf_each_tensor_type(tmp_path, bpe, tokenizer, qtype):
  config = dataclasses.replace(GGUF_LLAMA, tie_embeddings=True, rope_scaling=None)
  weights = random_weights(config, seed=20)
  held = write_gguf(tmp_path / "m.gguf", "llama", config, weights, bpe, types={"*": qtype})
  # The file really holds the type, and its values are the weights up to the type's rounding.
  assert gguf.GGUFReader(tmp_path / "m.gguf").tensors[0].tensor_type == qtype
  error = max(np.abs(held[n] - weights[n]).max() / np.abs(weights[n]).max() for n in weights)
  assert error <= {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2}.get(qtype, 0.2)
  check_gguf_model(tmp_path / "m.gguf", config, held, bpe, tokenizer)


def test_gguf_qwen2_with_qkv_biases(tmp_path, bpe, tokenizer):
  """llama.cpp runs `qwen2` with NeoX RoPE: its q/k rows (and biases) stay in HF order."""
  weights = random_weights(QWEN2, seed=30)
  held = write_gguf(tmp_path / "qwen2.gguf", "qwen2", QWEN2, weights, bpe,
                    types={"*": Q.Q8_0, "attn_q.weight": Q.F16})
  assert "blk.1.attn_k.bias" in {t.name for t in gguf.GGUFReader(tmp_path / "qwen2.gguf").tensors}
  model, _ = check_gguf_model(tmp_path / "qwen2.gguf", QWEN2, held, bpe, tokenizer)
  assert model.lm_head is None


# ---------------------------------------------------------------------------------- bad input

@pytest.fixture
def no_tensor_reads(monkeypatch):
  """Fails the test if any tensor data is read: a refused checkpoint is refused from its
  metadata, before minutes of reading and dequantizing a large file."""
  from llmx.formats import gguf as gguf_format, safetensors
  def refuse(*args, **kwargs):
    raise AssertionError("tensor data was read before the checkpoint was refused")
  monkeypatch.setattr(gguf_format.GGUFFile, "tensor", refuse)
  monkeypatch.setattr(safetensors, "read_tensors", refuse)


@pytest.mark.parametrize("arch", ["bert", "gemma3"])
def test_gguf_unsupported_architecture(tmp_path, bpe, arch, no_tensor_reads):
  path = tmp_path / f"{arch}.gguf"
  write_gguf(path, arch, QWEN2, random_weights(QWEN2, seed=0), bpe)
  with pytest.raises(CheckpointFormatError,
                     match=f"general.architecture='{arch}' is not supported") as e:
    pretrained.load(path)
  one_line_error(e, path, "llama, qwen2")


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0], ids=lambda q: q.name)
def test_gguf_unsupported_tensor_type(tmp_path, qtype):
  path = tmp_path / "iq.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  # Raw bytes of 4 rows of one 256-value block each: the writer derives the shape [4, 256].
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  w.add_tensor("blk.0.ffn_down.weight", np.zeros((4, nbytes), np.uint8), raw_dtype=qtype)
  w.add_tensor("blk.0.attn_norm.weight", np.ones(block, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  refused = f"tensor type {qtype.name} .*blk.0.ffn_down.weight.* not supported"
  with pytest.raises(LlmxError, match=refused) as e:
    pretrained.load(path)
  one_line_error(e, path, "Q4_1")


def test_gguf_tokenizer_not_byte_level_bpe(tmp_path, bpe, no_tensor_reads):
  path = tmp_path / "spm.gguf"
  write_gguf(path, "llama", LLAMA3, random_weights(LLAMA3, seed=0), bpe, tokenizer_model="llama")
  with pytest.raises(LlmxError, match="tokenizer.ggml.model='llama' is not supported") as e:
    pretrained.load(path)
  one_line_error(e, path, "gpt2")


def test_gguf_metadata_disagreeing_with_tensors(tmp_path, bpe, no_tensor_reads):
  """feed_forward_length says 96, the ffn tensors hold 64: refused with the tensor named."""
  path = tmp_path / "ffn.gguf"
  weights = random_weights(LLAMA3, seed=0)
  write_gguf(path, "llama", dataclasses.replace(LLAMA3, mlp_hidden=96), weights, bpe)
  with pytest.raises(CheckpointFormatError, match="does not match its own metadata") as e:
    pretrained.load(path)
  one_line_error(e, path, "blk.0.ffn_gate.weight")


def test_folder_without_config_json(saved, tmp_path, no_tensor_reads):
  shutil.copy(saved["llama3"][1] / "model.safetensors", tmp_path)
  with pytest.raises(CheckpointFormatError, match="no config.json") as e:
    pretrained.load(tmp_path)
  one_line_error(e, tmp_path)


def copy_with_config(folder, dest, **changes):
  shutil.copytree(folder, dest)
  config = json.loads((dest / "config.json").read_text())
  config.update(changes)
  (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
  return dest


def test_config_json_unsupported_architecture(saved, tmp_path, no_tensor_reads):
  folder = copy_with_config(saved["llama3"][1], tmp_path / "gemma",
                            architectures=["GemmaForCausalLM"], model_type="gemma")
  with pytest.raises(CheckpointFormatError, match="architectures=\\['GemmaForCausalLM'\\]") as e:
    pretrained.load(folder)
  one_line_error(e, folder / "config.json", "LlamaForCausalLM")


@pytest.mark.parametrize("changes, named", [
    (dict(hidden_size=2 ** 20, head_dim=None),
     "model.embed_tokens.weight: (300, 32), expected (300, 1048576)"),
    (dict(vocab_size=10 ** 9), "model.embed_tokens.weight: (300, 32), expected (1000000000, 32)"),
    (dict(num_hidden_layers=1000), "missing (8982): model.layers.2.input_layernorm.weight"),
], ids=["hidden_size", "vocab_size", "num_hidden_layers"])
def test_config_json_disagreeing_with_safetensors(saved, tmp_path, changes, named, no_tensor_reads):
  """Refused from the headers alone, before any model exists: the model that config.json
  describes would take terabytes (hidden_size, vocab_size), or minutes to trace (1000 layers)."""
  folder = copy_with_config(saved["llama3"][1], tmp_path / "bad", **changes)
  start = time.perf_counter()
  with pytest.raises(CheckpointFormatError, match="does not match its config.json") as e:
    pretrained.load(folder)
  assert time.perf_counter() - start < 2
  one_line_error(e, folder, named)


def test_shard_index_naming_a_file_outside_the_folder(saved, tmp_path, no_tensor_reads):
  folder = tmp_path / "sharded"
  shutil.copytree(saved["llama3"][1], folder)
  # The file exists, so only the name check stands between the index and reading it.
  (folder / "model.safetensors").rename(tmp_path / "x")
  names = read_header(tmp_path / "x")[0]
  (folder / hf.INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(names, "../x")}))
  with pytest.raises(CheckpointFormatError, match="shard '../x' is not a file name inside") as e:
    pretrained.load(folder)
  one_line_error(e, folder / hf.INDEX)


def test_broken_tokenizer_fails_before_reading_weights(saved, tmp_path, no_tensor_reads):
  folder = tmp_path / "tok"
  shutil.copytree(saved["llama3"][1], folder)
  (folder / "tokenizer.json").write_text("{not json")
  with pytest.raises(LlmxError, match="not a readable tokenizer.json") as e:
    pretrained.load(folder)
  one_line_error(e, folder / "tokenizer.json")


def test_chat_messages_refused(tokenizer):
  with pytest.raises(ChatTemplateError, match="messages\\[1\\] has unknown role 'wizard'") as e:
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                   {"role": "wizard", "content": "x"}])
  one_line_error(e, "system, user, assistant")
  with pytest.raises(ChatTemplateError,
                     match="messages\\[0\\].content must be a string, got list") as e:
    tokenizer.apply_chat_template([{"role": "user", "content": ["hi"]}])
  one_line_error(e)


def test_unsupported_dtype(saved, no_tensor_reads):
  with pytest.raises(CheckpointFormatError,
                     match="dtype='float64': must be one of float32, bfloat16") as e:
    pretrained.load(saved["llama3"][1], dtype="float64")
  one_line_error(e)


def test_a_weight_holding_nan_is_refused_naming_tensor_and_file(saved, tmp_path):
  from llmx.formats.safetensors import read_file, write_file
  folder = tmp_path / "nan"
  shutil.copytree(saved["llama3"][1], folder)
  tensors = {k: np.array(v) for k, v in read_file(folder / "model.safetensors").items()}
  name = "model.layers.1.mlp.down_proj.weight"
  tensors[name][3, 5] = np.nan
  write_file(folder / "model.safetensors", tensors)
  with pytest.raises(CheckpointFormatError, match="holds NaN or Inf values") as e:
    pretrained.load(folder)
  one_line_error(e, folder / "model.safetensors", name)

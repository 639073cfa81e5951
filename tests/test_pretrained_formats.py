"""Pretrained checkpoint formats on tiny synthetic models: Hugging Face folders that llmx writes
(Qwen2- and Llama-3-style, single file and sharded, float32 and bfloat16), llama.cpp GGUF files
written with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1; `llama` and `qwen2`
architectures), and the one-line errors for what llmx refuses.

The weights are random (norm scales and biases too, so that a swapped or dropped tensor shows),
and the reference is an independent float64 numpy forward written from the Hugging Face
layout (../shared/reference/smollm2.md): a round trip through llmx alone could not tell a
layout that llmx writes and reads back consistently from the one transformers expects.
"""
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
from llmx.formats.safetensors import read_file
from llmx.formats.tokenizer import PretrainedTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with the BOS variable, so that the template's variables are checked too.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                 "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
          "def add(a, b):\n    return a + b\n", "Numbers: 12345 and 678.",
          "the theory of the thing is that these three then thought"] * 20
TEXTS = ["Hello world", "the lazy fox, 2024!", "<|im_start|>user\nhi<|im_end|>\n", "ünïcödé ☃"]
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
      proj = lambda n: h @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(p + f"self_attn.{n}_proj.bias", 0)
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

QWEN2 = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                  bias=False, qkv_bias=True, positions="rope", rope_theta=1e6, norm="rmsnorm",
                  mlp="swiglu", mlp_hidden=64, layer_norm_epsilon=1e-6, tie_embeddings=True)
# original_max_position_embeddings=16 puts a head_dim-16 RoPE's wavelengths (6 to 2e5) in all
# three llama3 regimes (kept, blended, slowed by `factor`) within these 12 positions.
LLAMA3_SCALING = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                  ("high_freq_factor", 4.0), ("original_max_position_embeddings", 16))
LLAMA3 = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                   bias=False, qkv_bias=False, positions="rope", rope_theta=5e5, norm="rmsnorm",
                   mlp="swiglu", mlp_hidden=96, layer_norm_epsilon=1e-5, tie_embeddings=False,
                   rope_scaling=LLAMA3_SCALING)
LINEAR = GPTConfig(**{**LLAMA3.__dict__, "rope_scaling": (("rope_type", "linear"), ("factor", 4.0))})
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
          qwen["intermediate_size"], qwen["num_hidden_layers"]) == (4, 2, 32, 64, 2)
  assert qwen["tie_word_embeddings"] is True and qwen["rope_theta"] == 1e6
  assert qwen["rms_norm_eps"] == 1e-6 and qwen["hidden_act"] == "silu"
  assert qwen["rope_scaling"] is None and qwen["use_sliding_window"] is False
  names = set(read_file(saved["qwen2"][1] / "model.safetensors"))
  assert "model.layers.1.self_attn.k_proj.bias" in names and "lm_head.weight" not in names

  llama3 = json.loads((saved["llama3"][1] / "config.json").read_text())
  assert llama3["architectures"] == ["LlamaForCausalLM"] and llama3["model_type"] == "llama"
  assert llama3["num_key_value_heads"] == 2 and llama3["tie_word_embeddings"] is False
  assert llama3["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  assert llama3["attention_bias"] is False and llama3["vocab_size"] == 300
  assert (llama3["bos_token_id"], llama3["eos_token_id"]) == (1, 2)
  names = set(read_file(saved["llama3"][1] / "model.safetensors"))
  assert "lm_head.weight" in names and not any(n.endswith(".bias") for n in names)
  linear = json.loads((saved["linear"][1] / "config.json").read_text())
  assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  generation = json.loads((saved["llama3"][1] / "generation_config.json").read_text())
  assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
  tok_config = json.loads((saved["llama3"][1] / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == CHAT_TEMPLATE and tok_config["eos_token"] == "<|im_end|>"


def test_rope_scaling_changes_the_logits(saved):
  """The scaled models differ from the same weights without scaling, so the round trips above
  would have caught a rope_scaling lost on the way."""
  model, _ = saved["llama3"]
  plain = GPT(GPTConfig(**{**LLAMA3.__dict__, "rope_scaling": None}), rngs=nnx.Rngs(0))
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

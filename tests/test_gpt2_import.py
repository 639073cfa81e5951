"""Hugging Face GPT-2 checkpoints: import against PyTorch's outputs, export, round trip.

The reference is ../shared/reference/gpt2_tiny (a random GPT-2 saved by transformers) and
gpt2_tiny_public.npz (its logits, hidden states and greedy continuation computed with PyTorch).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llmx.inference import generate
from llmx.families.lm.hf import from_pretrained, save_pretrained
from llmx.families.lm.model import GPT, GPTConfig
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.safetensors import read_file
from tests.conftest import REPO

REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="module")
def reference():
  if not (REFERENCE / "gpt2_tiny" / "model.safetensors").is_file():
    pytest.fail(f"{REFERENCE}/gpt2_tiny is missing (see shared/reference/gpt2_tiny.md)")
  return dict(np.load(REFERENCE / "gpt2_tiny_public.npz"))


@pytest.fixture(scope="module")
def gpt2_tiny():
  return from_pretrained(REFERENCE / "gpt2_tiny")


def max_error_on_real_tokens(model, reference):
  ids, mask = jnp.asarray(reference["input_ids"]), jnp.asarray(reference["attention_mask"])
  logits = np.asarray(model(ids, attention_mask=mask))
  hidden = np.asarray(model.hidden_states(ids, attention_mask=mask)).reshape(*ids.shape, -1)
  real = reference["attention_mask"] == 1
  return (np.abs(logits - reference["logits"])[real].max(),
          np.abs(hidden - reference["last_hidden_state"])[real].max())


def test_logits_and_hidden_states_match_pytorch(gpt2_tiny, reference):
  assert gpt2_tiny.config.gelu_approximate and gpt2_tiny.config.tie_embeddings
  logits_error, hidden_error = max_error_on_real_tokens(gpt2_tiny, reference)
  assert logits_error <= 1e-5, logits_error
  assert hidden_error <= 1e-5, hidden_error


def test_the_tolerance_tells_the_gelu_forms_apart(reference):
  """With the exact erf GELU the logits move by ~4e-5: the 1e-5 check above would catch it."""
  exact = from_pretrained(REFERENCE / "gpt2_tiny", gelu_approximate=False)
  logits_error, _ = max_error_on_real_tokens(exact, reference)
  assert 2e-5 < logits_error < 1e-3, logits_error


def test_kv_cache_greedy_continuation_matches_transformers(gpt2_tiny, reference):
  expected = reference["greedy_ids"][0]
  out = generate(gpt2_tiny, expected[:7], max_new_tokens=20, temperature=0)
  np.testing.assert_array_equal(out, expected)


def test_save_load_round_trip_is_exact(gpt2_tiny, tmp_path):
  save_pretrained(gpt2_tiny, tmp_path)
  ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(
      REFERENCE / "gpt2_tiny" / "model.safetensors")
  assert sorted(ours) == sorted(theirs)  # transformers' names; lm_head tied, not stored
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["activation_function"] == "gelu_new" and config["n_inner"] == 512
  reloaded = from_pretrained(tmp_path)
  a, b = nnx.state(gpt2_tiny, nnx.Param), nnx.state(reloaded, nnx.Param)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)



def in_eval_mode(model) -> bool:
  dropouts = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)]
  return bool(dropouts) and all(d.deterministic for d in dropouts)


def test_sharded_folder_loads_the_same_model_in_eval_mode(gpt2_tiny, tmp_path):
  """A checkpoint split into shards with an index (as big models are) loads like the single
  file; with dropout asked for, it still comes back ready for inference."""
  tensors = read_file(REFERENCE / "gpt2_tiny" / "model.safetensors")
  config = json.loads((REFERENCE / "gpt2_tiny" / "config.json").read_text())
  hf.write_checkpoint(tmp_path, tensors, config, max_shard_bytes=300_000)
  assert len(hf.weight_files(tmp_path)) > 2 and not (tmp_path / "model.safetensors").exists()
  sharded = from_pretrained(tmp_path, dropout=0.1)
  assert sharded.config.dropout == 0.1 and in_eval_mode(sharded)
  for x, y in zip(jax.tree.leaves(nnx.state(gpt2_tiny, nnx.Param)),
                  jax.tree.leaves(nnx.state(sharded, nnx.Param))):
    np.testing.assert_array_equal(x, y)

def test_untied_biasless_model_round_trips(tmp_path):
  """A model trained here without biases (nanoGPT's bias=False) and with an untied head exports
  with zero biases and an lm_head.weight, and computes the same logits after reloading."""
  model = GPT(GPTConfig(vocab_size=53, block_size=19, n_layer=2, n_head=3, d_model=24, bias=False,
                        tie_embeddings=False, gelu_approximate=True),
              rngs=nnx.Rngs(params=3, dropout=4))
  model.eval()
  save_pretrained(model, tmp_path / "m")
  tensors = load_file(tmp_path / "m" / "model.safetensors")
  assert tensors["lm_head.weight"].shape == (53, 24)
  assert not tensors["transformer.h.1.mlp.c_fc.bias"].any()
  reloaded = from_pretrained(tmp_path / "m")
  assert not reloaded.config.tie_embeddings
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 19)))
  np.testing.assert_allclose(reloaded(tokens), model(tokens), atol=1e-6, rtol=0)


def test_bad_folders_and_unexportable_models(tmp_path, gpt2_tiny):
  with pytest.raises(CheckpointFormatError, match="no config.json"):
    from_pretrained(tmp_path)
  save_pretrained(gpt2_tiny, tmp_path / "bad")
  config = json.loads((tmp_path / "bad" / "config.json").read_text())
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
  with pytest.raises(CheckpointFormatError, match=r"missing weights \(12\): transformer.h.3.ln_1.weight, "):
    from_pretrained(tmp_path / "bad")
  (tmp_path / "bad" / "config.json").write_text(
      json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
    from_pretrained(tmp_path / "bad")
  rope = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8,
                       positions="rope"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cannot hold positions='rope'"):
    save_pretrained(rope, tmp_path / "rope")

"""The KV-cache generator: same tokens as uncached decoding, batching, filters, stops, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx.inference.sampling import (GenerationError, filter_logits, generate, generate_batch,
                             generate_uncached, sample_logits)
from llmx.families.lm.model import GPT, GPTConfig

VOCAB = 41


def model_of(**kw):
  cfg = dict(vocab_size=VOCAB, block_size=23, n_layer=2, n_head=4, d_model=24)
  cfg.update(kw)
  model = GPT(GPTConfig(**cfg), rngs=nnx.Rngs(params=cfg.pop("seed", 5), dropout=1))
  # Larger weights than the 0.02 init: peaked, far-from-tied logits, so greedy decoding is a
  # real check (a near-uniform model could pick a different argmax from rounding alone).
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params))
  model.eval()
  return model


MODELS = {
    "gpt2": dict(),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                  tie_embeddings=False, logits_soft_cap=20.0, attn_logits_soft_cap=30.0),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
  return model_of(**MODELS[request.param])


def prompts(*lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]


def test_cached_greedy_equals_uncached_for_batched_prompts_of_different_lengths(model):
  batch = prompts(3, 9, 1, 14)
  rows = generate(model, batch, max_new_tokens=9, temperature=0)  # 14 + 9 = 23 = block_size
  for prompt, row in zip(batch, rows):
    np.testing.assert_array_equal(row, generate_uncached(model, prompt, max_new_tokens=9))
    np.testing.assert_array_equal(row[:len(prompt)], prompt)


def test_single_prompt_returns_one_array_and_seeded_sampling_repeats():
  model = model_of()
  p = prompts(5)[0]
  a = generate(model, p, max_new_tokens=7, temperature=0.9, top_k=10, top_p=0.9, seed=3)
  b = generate(model, list(p), max_new_tokens=7, temperature=0.9, top_k=10, top_p=0.9, seed=3)
  assert a.shape == (12,) and np.array_equal(a, b)
  runs = {tuple(generate(model, p, max_new_tokens=7, temperature=2.0, seed=s)) for s in range(4)}
  assert len(runs) > 1


def test_generation_past_the_context_keeps_going(model):
  """40 new tokens after a 10-token prompt in a 23-token context: the cache is rebuilt from the
  recent tokens; until the context is full the tokens are the uncached ones."""
  p = prompts(10)[0]
  out = generate(model, p, max_new_tokens=40, temperature=0)
  assert out.shape == (50,) and out.min() >= 0 and out.max() < VOCAB
  np.testing.assert_array_equal(out[:23], generate_uncached(model, p, max_new_tokens=13))


def test_stop_tokens_and_length_limits():
  model = model_of()
  p = prompts(4, 6, seed=1)
  free = generate(model, p, max_new_tokens=12, temperature=0)
  stop = int(free[0][4 + 2])  # the 3rd new token of row 0
  rows = generate(model, p, max_new_tokens=12, temperature=0, stop_tokens=[stop])
  for full, row, n in zip(free, rows, (4, 6)):
    new = list(full[n:])
    end = new.index(stop) + 1 if stop in new else len(new)
    np.testing.assert_array_equal(row, full[:n + end])  # the stop token is kept
  assert rows[0][-1] == stop and len(rows[0]) <= 4 + 3
  capped = generate(model, p, max_new_tokens=12, temperature=0, max_length=9)
  assert [len(r) for r in capped] == [9, 9]
  np.testing.assert_array_equal(capped[1], free[1][:9])
  result = generate_batch(model, p, max_new_tokens=12, temperature=0)  # compiled above: cached
  assert result.new_tokens == 24 and result.tokens_per_s > 0 and result.compile_s < 0.5


def test_top_k_and_top_p_keep_exactly_the_allowed_tokens():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(5, 37)).astype(np.float32) * 2
  filter_jit = jax.jit(filter_logits, static_argnames="top_k")
  for k in (1, 4, 37):
    kept = np.isfinite(np.asarray(filter_jit(jnp.asarray(logits), top_k=k)))
    expected = logits >= np.sort(logits, axis=1)[:, -k][:, None]
    np.testing.assert_array_equal(kept, expected)
  for p in (0.05, 0.5, 0.9):
    kept = np.isfinite(np.asarray(filter_jit(jnp.asarray(logits), top_p=p)))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row in range(5):
      order = np.argsort(-probs[row])
      mass_before = np.cumsum(probs[row][order]) - probs[row][order]
      expected = set(order[mass_before < p])  # smallest set reaching p, top token always in
      assert set(np.flatnonzero(kept[row])) == expected
      assert probs[row][list(expected)].sum() >= p
  both = np.isfinite(np.asarray(filter_jit(jnp.asarray(logits), top_k=6, top_p=0.5)))
  assert both.sum(1).max() <= 6 and both.sum(1).min() >= 1


def test_sampling_draws_only_and_all_of_the_allowed_tokens():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 29)), jnp.float32)
  allowed = set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_k=5)))))
  draw = jax.jit(jax.vmap(lambda key: sample_logits(key, logits, temperature=1.5, top_k=5)[0]))
  seen = set(np.asarray(draw(jax.random.split(jax.random.key(0), 2000))).tolist())
  assert seen == allowed
  assert int(sample_logits(None, logits, temperature=0)[0]) == int(jnp.argmax(logits))


def test_bad_arguments_are_clear_errors():
  model = model_of()
  p = prompts(5)[0]
  with pytest.raises(GenerationError, match="prompt 1 has 24 tokens, longer than the model's "
                                            "context of 23 tokens"):
    generate(model, [p, np.zeros(24, np.int32)], max_new_tokens=1)
  with pytest.raises(GenerationError, match="longer than the context of 23"):
    generate_uncached(model, np.zeros(24, np.int32), max_new_tokens=1)
  for top_p in (0.0, -0.5, 1.5):
    with pytest.raises(GenerationError, match=rf"top_p={top_p}: must lie in \(0, 1\]"):
      generate(model, p, max_new_tokens=3, top_p=top_p)
  with pytest.raises(GenerationError, match=r"temperature=-0.5: must be >= 0"):
    generate(model, p, max_new_tokens=3, temperature=-0.5)
  with pytest.raises(GenerationError, match="top_k=-1"):
    generate(model, p, max_new_tokens=3, top_k=-1)
  with pytest.raises(GenerationError, match="max_new_tokens=-2"):
    generate(model, p, max_new_tokens=-2)
  with pytest.raises(GenerationError, match="prompt 0: need a non-empty 1-D array"):
    generate(model, [np.zeros(0, np.int32)], max_new_tokens=3)

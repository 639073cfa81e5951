"""The LLaMA-style switches of the GPT model: RoPE, GQA, RMSNorm, SwiGLU, soft-capping, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmx.families.lm import recipe as lm_recipe
from llmx.families.lm.model import GPT, GPTConfig
from llmx.nn.params import num_params
from llmx.nn.mlp import SwiGLU
from llmx.nn.rope import apply_rope
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config

VOCAB = 43
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False, logits_soft_cap=15.0)


def model_of(seed=0, **kw):
  cfg = dict(vocab_size=VOCAB, block_size=21, n_layer=2, n_head=4, d_model=40)
  cfg.update(kw)
  return GPT(GPTConfig(**cfg), rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def test_rope_scores_depend_only_on_the_offset():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 3, 34)), jnp.float32) for _ in range(2))

  def score(m, n):
    rq = apply_rope(q, jnp.full((1, 1), m))
    rk = apply_rope(k, jnp.full((1, 1), n))
    return np.asarray(jnp.einsum("bthd,bthd->h", rq, rk))

  for m, n in ((5, 2), (9, 0), (3, 11)):
    for shift in (1, 17, 250):
      np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-4)
  assert np.abs(score(5, 2) - score(6, 2)).max() > 1e-3  # the offset does matter
  np.testing.assert_allclose(apply_rope(q, jnp.zeros((1, 1), jnp.int32)), q)  # position 0
  norms = jnp.linalg.norm(apply_rope(q, jnp.full((1, 1), 1234)), axis=-1)
  np.testing.assert_allclose(norms, jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
  mha, gqa = model_of(n_kv_head=None), model_of(n_kv_head=4)
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, VOCAB)
  np.testing.assert_array_equal(mha(tokens), gqa(tokens))


def test_gqa_equals_mha_with_repeated_kv_heads():
  """n_kv_head=2 of 4 heads computes what MHA computes with each K/V head used twice."""
  gqa = model_of(n_kv_head=2, positions="rope")
  mha = model_of(n_kv_head=None, positions="rope")
  hd = 10
  for g_block, m_block in zip(gqa.blocks, mha.blocks):
    w = g_block.attn.qkv.kernel[...].reshape(40, 8, hd)  # heads: q0..q3 | k0 k1 | v0 v1
    b = g_block.attn.qkv.bias[...].reshape(8, hd)
    take = np.array([0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7])  # k0 k0 k1 k1, v0 v0 v1 v1
    m_block.attn.qkv.kernel[...] = w[:, take].reshape(40, 12 * hd)
    m_block.attn.qkv.bias[...] = b[take].reshape(12 * hd)
    for name in ("ln_1", "ln_2", "mlp"):
      nnx.update(getattr(m_block, name), nnx.state(getattr(g_block, name)))
    nnx.update(m_block.attn.out, nnx.state(g_block.attn.out))
  for name in ("wte", "ln_f"):
    nnx.update(getattr(mha, name), nnx.state(getattr(gqa, name)))
  tokens = jax.random.randint(jax.random.key(2), (3, 17), 0, VOCAB)
  np.testing.assert_allclose(mha(tokens), gqa(tokens), atol=2e-6, rtol=0)
  assert num_params(gqa) < num_params(mha)


def test_swiglu_is_the_formula():
  mlp = SwiGLU(12, 20, use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (7, 12))
  w = mlp.gate_up.kernel[...]
  expected = (jax.nn.silu(x @ w[:, :20]) * (x @ w[:, 20:])) @ mlp.down.kernel[...]
  np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_llama_model_soft_caps_its_logits_and_its_loss_is_cross_entropy():
  model = model_of(**LLAMA)
  # Large weights: the logits would reach hundreds without the cap.
  nnx.update(model, jax.tree.map(lambda p: p * 30, nnx.state(model, nnx.Param)))
  tokens = jax.random.randint(jax.random.key(3), (2, 21), 0, VOCAB)
  targets = jax.random.randint(jax.random.key(4), (2, 21), 0, VOCAB)
  logits = model(tokens)
  raw = model.hidden_states(tokens) @ model.head_weight()
  assert float(jnp.abs(raw).max()) > 30.0 and 10.0 < float(jnp.abs(logits).max()) <= 15.0
  np.testing.assert_allclose(logits.reshape(raw.shape), 15.0 * jnp.tanh(raw / 15.0), rtol=1e-6)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  np.testing.assert_allclose(model.loss(tokens, targets), expected, rtol=1e-5)
  # No biases anywhere; norms are RMSNorm (scale only); no position table; untied head.
  names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert not any(n.endswith("bias") or n.endswith("offset") for n in names)
  assert model.wpe is None and "lm_head/kernel" in names


def test_llama_model_learns_and_is_causal():
  model = model_of(**LLAMA)
  tokens = jax.random.randint(jax.random.key(5), (4, 21), 0, VOCAB)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p, rest).loss(tokens[:, :-1], tokens[:, 1:]))(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss

  opt, losses = tx.init(params), []
  for _ in range(120):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[0] > 3.0 and losses[-1] < 0.2, (losses[0], losses[-1])
  trained = nnx.merge(graphdef, params, rest)
  changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % VOCAB)
  np.testing.assert_allclose(trained(changed)[:, :12], trained(tokens)[:, :12], atol=1e-5)


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
    model_of(n_kv_head=3)
  with pytest.raises(ValueError, match="norm='batchnorm': must be one of 'layernorm', 'rmsnorm'"):
    model_of(norm="batchnorm")
  with pytest.raises(ValueError, match="positions='rope' needs an even head dim"):
    model_of(d_model=36, positions="rope")  # head dim 9
  with pytest.raises(ValueError, match="logits_soft_cap=-1.0: must be > 0"):
    model_of(logits_soft_cap=-1.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(model=dict(n_kv_head=3)), r"model.n_head=4 is not divisible by model.n_kv_head=3"),
    (dict(model=dict(n_kv_head=-1)), r"model.n_kv_head=-1: must be an integer >= 0"),
    (dict(model=dict(positions="alibi")), r"model.positions='alibi': must be one of 'learned', 'rope'"),
    (dict(model=dict(mlp="relu")), r"model.mlp='relu'"),
    (dict(model=dict(logits_soft_cap=-3.0)), r"model.logits_soft_cap=-3.0: must lie in \[0.0, inf\)"),
    (dict(model=dict(d_model=36, n_head=4)), r"model.positions='rope' needs an even head dim"),
    (dict(data=dict(tokenizer="wordpiece")), r"data.tokenizer='wordpiece': must be one of 'char', 'bpe'"),
    (dict(data=dict(vocab_size=100)), r"data.vocab_size=100: must be an integer >= 257"),
    (dict(data=dict(tokenizer="char", tokenizer_path="t.json")), r"needs data.tokenizer='bpe'"),
])
def test_config_validation(overrides, message):
  c = load_config("lm.py:llama_tiny")
  for section, values in overrides.items():
    c[section].update(values)
  with pytest.raises(ConfigError, match=message):
    lm_recipe.validate(c)


def test_llama_tiny_matches_the_gpt2_style_baseline_in_size():
  c = load_config("lm.py:llama_tiny")
  lm_recipe.validate(c)
  llama = lm_recipe.model_config(c, 2048)
  assert (llama.positions, llama.norm, llama.mlp, llama.n_kv_head, llama.bias,
          llama.tie_embeddings, llama.logits_soft_cap) == ("rope", "rmsnorm", "swiglu", 2, False,
                                                           False, 30.0)
  c.model.update(positions="learned", norm="layernorm", mlp="gelu", n_kv_head=0, bias=True,
                 logits_soft_cap=0.0, mlp_hidden=0)
  baseline = lm_recipe.model_config(c, 2048)
  n_llama = num_params(nnx.eval_shape(lambda: GPT(llama, rngs=nnx.Rngs(0))), skip=("wpe",))
  n_base = num_params(nnx.eval_shape(lambda: GPT(baseline, rngs=nnx.Rngs(0))), skip=("wpe",))
  assert abs(n_llama - n_base) / n_base < 0.01, (n_llama, n_base)


def test_llama_bpe_trains_resumes_generates_and_evaluates(tmp_path, data_dir):
  text = (data_dir / "tinyshakespeare.txt").read_text()[:60_000]
  (tmp_path / "shakespeare.txt").write_text(text)
  work = str(tmp_path / "run")
  common = ["experiments.pretrain_lm", "--config=experiments/configs/lm.py:llama_tiny",
            f"--workdir={work}", f"--config.data.path={tmp_path / 'shakespeare.txt'}",
            "--config.data.vocab_size=300", "--config.model.n_layer=1", "--config.model.d_model=32",
            "--config.model.mlp_hidden=64", "--config.model.block_size=24",
            "--config.train.batch_size=4", "--config.train.warmup_steps=2",
            "--config.train.eval_every=3", "--config.train.eval_batches=2",
            "--config.train.checkpoint_every=3", "--config.train.log_every=3",
            "--config.sample.max_new_tokens=0"]
  cli(*common, "--config.train.steps=3")
  second = cli(*common, "--config.train.steps=6")  # lr_decay_steps=600: the same schedule
  assert "resumed" in second.stdout and "step 6" in second.stdout
  gen = cli("experiments.generate", f"--workdir={work}", "--prompt=ROMEO:", "--prompt=JULIET: O",
            "--max_new_tokens=30", "--top_p=0.9", "--seed=1")
  first, rest = gen.stdout.split("\n" + "-" * 40 + "\n")
  assert first.startswith("ROMEO:") and rest.startswith("JULIET: O")
  assert "tokens/s" in gen.stderr
  evaluation = cli("experiments.eval_lm", f"--workdir={work}",
                   f"--data={tmp_path / 'shakespeare.txt'}").stdout
  bits = float(evaluation.split("bits per char:")[1].split()[0])
  assert 0.5 < bits < 9.0 and "60,000 characters" in evaluation

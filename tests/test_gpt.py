import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmx.families.lm.model import GPT, GPTConfig
from llmx.nn.params import num_params


def tiny(**kw):
  cfg = dict(vocab_size=37, block_size=24, n_layer=2, n_head=2, d_model=32)
  cfg.update(kw)
  return GPT(GPTConfig(**cfg), rngs=nnx.Rngs(params=0, dropout=1))


def test_logits_shape_and_loss_matches_plain_cross_entropy():
  model = tiny()
  tokens = jax.random.randint(jax.random.key(1), (3, 19), 0, 37)
  targets = jax.random.randint(jax.random.key(2), (3, 19), 0, 37)
  logits = model(tokens)
  assert logits.shape == (3, 19, 37)
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  np.testing.assert_allclose(model.loss(tokens, targets), ref, rtol=1e-5)


def test_causality_through_gradients():
  """d logits[t] / d embedding[s] is zero for every s > t."""
  model = tiny()
  model.eval()
  tokens = jax.random.randint(jax.random.key(3), (1, 13), 0, 37)
  emb = model.wte(tokens)

  def logits_at(e, t):
    model_fn = lambda e: _forward_from_embeddings(model, e)
    return model_fn(e)[0, t].sum()

  for t in (0, 5, 12):
    g = jax.grad(logits_at)(emb, t)
    influence = jnp.abs(g[0]).sum(-1)
    assert jnp.all(influence[t + 1:] == 0), f"position {t} sees the future"
    assert jnp.all(influence[:t + 1] > 0)


def _forward_from_embeddings(model, emb):
  batch, seq, _ = emb.shape
  x = (emb + model.wpe[...][:seq][None]).reshape(batch * seq, -1)
  for block in model.blocks:
    x = block(x, batch=batch)
  h = model.ln_f(x)
  return (h @ model.head_weight()).reshape(batch, seq, -1)


def test_tiny_model_overfits_one_batch():
  model = tiny(dropout=0.0)
  tokens = jax.random.randint(jax.random.key(4), (4, 17), 0, 37)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(tokens[:, :-1], tokens[:, 1:]))(params)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(params, upd), opt, loss

  first = None
  for _ in range(150):
    params, opt, loss = step(params, opt)
    first = loss if first is None else first
  assert first > 3.0 and loss < 0.1, (first, loss)


def test_untied_head_and_param_count():
  tied, untied = tiny(), tiny(tie_embeddings=False)
  assert num_params(untied) == num_params(tied) + 32 * 37
  assert untied(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 37)


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="d_model=30 is not divisible by n_head=4"):
    tiny(d_model=30, n_head=4)
  with pytest.raises(ValueError, match="exceeds block_size=24"):
    tiny()(jnp.zeros((1, 25), jnp.int32))

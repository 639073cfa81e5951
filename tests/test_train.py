import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmx.data.lm_windows import fixed_batches, lm_batches
from llmx.inference import generate
from llmx.families.lm.model import GPT, GPTConfig
from llmx.train import loop, optimizers
from llmx.train.checkpoint import Checkpointer
from llmx.train.config_check import ConfigError
from llmx.train.step import supervised
from tests.conftest import adamw

TOKENS = np.random.default_rng(0).integers(0, 29, 5000).astype(np.int32)
GPT_CFG = GPTConfig(vocab_size=29, block_size=16, n_layer=1, n_head=2, d_model=16, dropout=0.1)


def lm_loss(model, batch):
  return model.loss(batch[:, :-1], batch[:, 1:])


def make_trainable(lr=1e-3, model_cfg=GPT_CFG):
  model = GPT(model_cfg, rngs=nnx.Rngs(params=0, dropout=1))
  sched = optimizers.warmup_cosine(lr, warmup_steps=2, decay_steps=12, end=lr / 10)
  return supervised(model, adamw(sched), lm_loss), sched


def run(workdir, steps, *, lr=1e-3, checkpoint_every=4, model_cfg=GPT_CFG, tokens=TOKENS):
  trainable, sched = make_trainable(lr, model_cfg)
  return loop.train(
      trainable, schedule=sched,
      train_batches=lm_batches(tokens, block_size=16, batch_size=4, seed=0),
      eval_batches=fixed_batches(TOKENS, block_size=16, batch_size=4, num_batches=2, seed=1),
      workdir=str(workdir), meta=dict(must_match=dict(model=vars(model_cfg).copy())),
      options=loop.LoopOptions(steps=steps, eval_every=4, checkpoint_every=checkpoint_every,
                               log_every=2, tokens_per_step=64))


def leaves(tree):
  as_numpy = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return [as_numpy(x) for x in jax.tree.leaves(tree)]


def test_checkpoint_round_trip_is_exact(tmp_path):
  model = GPT(GPT_CFG, rngs=nnx.Rngs(params=0, dropout=1))
  tx = adamw(1e-3)
  state = supervised(model, tx, lm_loss).init()
  # One real update so the optimizer moments are not zeros.
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, state["params"])
  updates, state["opt_state"] = tx.update(grads, state["opt_state"], state["params"])
  state["params"] = optax.apply_updates(state["params"], updates)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(7, state, {"hello": "world"})
  ckpt.wait()
  step, restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
  assert step == 7 and meta == {"hello": "world"}
  for a, b in zip(leaves(state), leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) for k in jax.tree.leaves(restored["rest"]))
  ckpt.close()


def test_resume_continues_and_matches_uninterrupted_run(tmp_path):
  full = run(tmp_path / "full", 12)
  part = run(tmp_path / "split", 8)
  assert part.step == 8
  resumed = run(tmp_path / "split", 12)
  assert resumed.step == 12
  for a, b in zip(leaves(full.state["params"]), leaves(resumed.state["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]
  assert "val_loss" in lines[1] and "train_loss" in lines[0]
  assert list((tmp_path / "split" / "tensorboard").glob("events.out.tfevents.*"))


def test_incompatible_checkpoint_names_the_fields(tmp_path):
  run(tmp_path, 4)
  other = GPTConfig(**{**vars(GPT_CFG), "d_model": 32})
  with pytest.raises(ConfigError, match=r"model.d_model: 16 in the checkpoint, 32 now"):
    run(tmp_path, 8, model_cfg=other)


def test_nan_loss_stops_before_overwriting_the_last_good_checkpoint(tmp_path):
  run(tmp_path, 4)
  good = Checkpointer(tmp_path / "checkpoints").restore(
      jax.eval_shape(make_trainable()[0].init))
  # lr=NaN poisons the parameters at step 5, so the loss of step 6 is the first NaN.
  with pytest.raises(loop.NonFiniteLossError, match="NaN or Inf at step 6"):
    run(tmp_path, 12, lr=float("nan"))
  ckpt = Checkpointer(tmp_path / "checkpoints")
  assert ckpt.steps() == [4]
  step, state, _ = ckpt.restore(jax.eval_shape(lambda: good[1]))
  for a, b in zip(leaves(good[1]), leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_generation_is_deterministic_for_a_seed():
  model = GPT(GPT_CFG, rngs=nnx.Rngs(0))
  model.eval()
  prompt = np.array([1, 2, 3], np.int32)
  kw = dict(max_new_tokens=40, temperature=1.0, top_k=5)
  a, b = generate(model, prompt, seed=7, **kw), generate(model, prompt, seed=7, **kw)
  c = generate(model, prompt, seed=8, **kw)
  assert a.shape == (43,) and np.array_equal(a[:3], prompt)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = generate(model, prompt, max_new_tokens=5, temperature=0.0)
  logits = model(jnp.asarray(prompt)[None])[0, -1]
  assert greedy[3] == int(jnp.argmax(logits))
  with pytest.raises(ValueError, match="temperature=-1"):
    generate(model, prompt, max_new_tokens=5, temperature=-1)


def test_schedule_is_nanogpts_get_lr():
  import math
  sched = optimizers.warmup_cosine(1e-3, warmup_steps=100, decay_steps=2000, end=1e-4)

  def nanogpt_get_lr(it):  # nanoGPT train.py
    if it < 100:
      return 1e-3 * (it + 1) / (100 + 1)
    ratio = (it - 100) / (2000 - 100)
    return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

  for it in (0, 1, 50, 99, 100, 101, 777, 1999, 2000):
    assert abs(float(sched(it)) - nanogpt_get_lr(it)) < 1e-9, it


def test_train_step_uses_dropout_even_if_the_model_came_in_eval_mode():
  """A pretrained model loads in eval mode; training must still switch dropout on."""
  class Dropped(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jnp.ones((1000,)))
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self):
      return self.drop(self.w.value).sum()

  model = Dropped(nnx.Rngs(0, dropout=1))
  model.eval()
  trainable = supervised(model, optax.sgd(0.0), lambda m, batch: m())
  state = trainable.init()
  _, train_metrics = jax.jit(trainable.train_step)(state, jnp.zeros(()))
  eval_metrics = jax.jit(trainable.eval_step)(state, jnp.zeros(()))
  assert float(eval_metrics["loss"]) == 1000.0
  assert float(train_metrics["train_loss"]) != 1000.0  # inverted dropout: about half, doubled

"""llmx/train/optimizers.py: the families' former optimizer builders, reproduced exactly; every
optimizer and schedule trains; bad fields fail as one line naming the field."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmx.train import optimizers
from llmx.train.config_check import ConfigError
from tests.conftest import load_config


# ------------------------------------------- the builders as the families wrote them (frozen here)

def old_warmup_cosine(peak, *, warmup_steps, decay_steps, end):  # llmx/train/optim.py
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / (warmup_steps + 1), peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(decay_steps, warmup_steps + 1), end_value=end)


def old_adamw(schedule, *, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0):  # optim.py
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx


def old_rsqrt(peak, warmup_steps):  # llmx/families/seq2seq/recipe.py
  warmup = max(warmup_steps, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32) + 1
    return peak * jnp.minimum(s / warmup, jnp.sqrt(warmup / s))
  return schedule


def old_lm(c):  # llmx/families/lm/recipe.py build_optimizer
  t = c.train
  schedule = old_warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps,
                               decay_steps=t.lr_decay_steps or t.steps, end=t.min_learning_rate)
  return old_adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None), schedule


def old_bert(c):  # llmx/families/bert/pretrain.py build_optimizer (pretraining and fine-tuning)
  t = c.train
  schedule = old_warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps, decay_steps=t.steps,
                               end=t.min_learning_rate)
  return old_adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None), schedule


def old_seq2seq(c):  # llmx/families/seq2seq/recipe.py build_optimizer
  t = c.train
  if t.schedule == "rsqrt":
    schedule = old_rsqrt(t.learning_rate, t.warmup_steps)
  else:
    schedule = old_warmup_cosine(t.learning_rate, warmup_steps=t.warmup_steps,
                                 decay_steps=t.steps, end=t.min_learning_rate)
  return old_adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                   grad_clip=t.grad_clip or None), schedule


def old_gan(c):  # llmx/families/gan/recipe.py build_optimizers -> (generator, discriminator)
  t = c.train

  def adam(lr, updates):
    schedule = optax.linear_schedule(lr, 0.0, updates) if t.schedule == "linear" else lr
    return optax.adam(schedule, b1=t.beta1, b2=t.beta2)
  return adam(t.learning_rate, t.steps), adam(t.d_learning_rate, t.steps * c.gan.n_critic)


# ------------------------------------------------------------------------------------ helpers

def _params():
  """Matrices (decayed), a vector and a scalar (not decayed)."""
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "conv": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "scale": jnp.ones((), jnp.float32)}


def _updates(tx, steps=12):
  """The parameters after `steps` updates with fixed pseudo-random gradients (some large, so
  that clipping acts), and the optimizer state's tree structure."""
  params, state = _params(), None
  state = tx.init(params)
  structure = jax.tree.structure(state)
  for i in range(steps):
    keys = jax.random.split(jax.random.key(i), len(params))
    grads = {k: (10.0 if i % 3 == 0 else 0.1) * jax.random.normal(key, p.shape)
             for (k, p), key in zip(params.items(), keys)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, structure


def _assert_same(old_tx, old_schedule, new_tx, new_schedule, steps):
  old_params, old_structure = _updates(old_tx)
  new_params, new_structure = _updates(new_tx)
  assert new_structure == old_structure  # the checkpoints' optimizer state keeps its tree
  for k in old_params:
    np.testing.assert_array_equal(new_params[k], old_params[k], err_msg=k)
  points = sorted({0, 1, 2, steps // 3, steps - 1, steps, steps + 7, *range(0, steps + 1, 97)})
  old_values = [float(old_schedule(i) if callable(old_schedule) else old_schedule) for i in points]
  np.testing.assert_array_equal([float(new_schedule(i)) for i in points], old_values)


# ----------------------------------------------------------------- the families, reproduced

@pytest.mark.parametrize("spec", ["lm.py", "lm.py:nanogpt_baby", "lm.py:llama_tiny", "lm.py:smoke"])
def test_lm(spec):
  c = load_config(spec)
  _assert_same(*old_lm(c), *optimizers.from_config(c.train), c.train.steps)


def test_lm_without_clipping_and_with_a_decay_horizon():
  c = load_config("lm.py:smoke")
  c.train.update(grad_clip=0.0, lr_decay_steps=9, warmup_steps=3)
  _assert_same(*old_lm(c), *optimizers.from_config(c.train), c.train.steps)


@pytest.mark.parametrize("spec", ["bert.py", "bert.py:smoke", "finetune.py:sst2"])
def test_bert(spec):
  c = load_config(spec)
  _assert_same(*old_bert(c), *optimizers.from_config(c.train), c.train.steps)


@pytest.mark.parametrize("schedule", ["cosine", "rsqrt"])
@pytest.mark.parametrize("spec", ["translation.py", "translation.py:smoke"])
def test_seq2seq(spec, schedule):
  c = load_config(spec)
  c.train.schedule = schedule
  _assert_same(*old_seq2seq(c), *optimizers.from_config(c.train), c.train.steps)


@pytest.mark.parametrize("spec", ["gan.py:grid", "gan.py:ring", "gan.py:digits", "gan.py:smoke"])
def test_gan(spec):
  c = load_config(spec)
  t, n_critic = c.train, c.gan.n_critic
  old_g, old_d = old_gan(c)
  g_tx, g_schedule = optimizers.from_config(t)
  d_tx, d_schedule = optimizers.from_config(t, steps=t.steps * n_critic,
                                            learning_rate=t.d_learning_rate)
  constant = t.schedule == "constant"
  old_g_schedule = t.learning_rate if constant else optax.linear_schedule(t.learning_rate, 0.0, t.steps)
  old_d_schedule = (t.d_learning_rate if constant else
                    optax.linear_schedule(t.d_learning_rate, 0.0, t.steps * n_critic))
  _assert_same(old_g, old_g_schedule, g_tx, g_schedule, t.steps)
  _assert_same(old_d, old_d_schedule, d_tx, d_schedule, t.steps * n_critic)


# ------------------------------------------------------------ every optimizer, every schedule

def _quadratic_loss(params):
  """Least squares with an optimum at w = 1, b = -2 (a matrix, decayed, and a vector)."""
  x = jnp.linspace(-1, 1, 24).reshape(8, 3)
  target = x @ jnp.ones((3, 2)) - 2.0
  return jnp.mean(jnp.square(x @ params["w"] + params["b"] - target))


def _train(tx, steps=300):
  params = {"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), 0.5)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_quadratic_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return float(_quadratic_loss(params))


def _start_loss():
  return float(_quadratic_loss({"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), 0.5)}))


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {}), ("sgd", dict(momentum=0.9)), ("adam", {}), ("adamw", dict(weight_decay=1e-4)),
    ("rmsprop", {}), ("rmsprop", dict(momentum=0.5)), ("adafactor", {}),
    ("sgd", dict(weight_decay=1e-4, grad_clip=1.0))])
def test_every_optimizer_trains_a_quadratic_down(name, kwargs):
  # Decaying to 0 lets the sign-like steps of adam, rmsprop and adafactor settle at the optimum.
  lr = optimizers.lr_schedule("cosine", 0.1, steps=300)
  assert _train(optimizers.optimizer(name, lr, **kwargs)) < 1e-3 * _start_loss()


@pytest.mark.parametrize("schedule", optimizers.SCHEDULES)
def test_every_schedule_trains_through_from_config(schedule):
  c = load_config("lm.py:smoke").train
  c.update(optimizer="adam", schedule=schedule, steps=300, warmup_steps=10, learning_rate=0.05,
           min_learning_rate=0.0)
  tx, lr = optimizers.from_config(c)
  values = [float(lr(i)) for i in range(310)]
  assert max(values) == pytest.approx(0.05, rel=1e-6) and values[0] < 0.05 / 5  # warmed up
  assert _train(tx) < 1e-2 * _start_loss()


def test_linear_reaches_zero_at_the_end_and_constant_stays():
  for warmup in (0, 5):
    lin = optimizers.lr_schedule("linear", 1.0, steps=50, warmup_steps=warmup)
    assert float(lin(50)) == 0.0 and float(lin(25 + warmup // 2)) == pytest.approx(0.5, abs=0.03)
  assert optimizers.lr_schedule("constant", 0.3, steps=50) == 0.3
  const = optimizers.lr_schedule("constant", 0.3, steps=50, warmup_steps=2)
  assert [round(float(const(i)), 6) for i in (0, 1, 2, 49)] == [0.1, 0.2, 0.3, 0.3]


def test_weight_decay_touches_matrices_only():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in optimizers.OPTIMIZERS:
    if name == "adafactor":  # its updates are relative to the parameters' scale
      continue
    tx = optimizers.optimizer(name, 0.1, weight_decay=0.5)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 0, name
    assert float(jnp.abs(updates["b"]).max()) == 0, name


# --------------------------------------------------------------------------------- bad fields

@pytest.mark.parametrize("field,value", [
    ("optimizer", "lion"), ("schedule", "step"), ("learning_rate", 0.0), ("momentum", 1.0),
    ("beta1", -0.1), ("beta2", 1.0), ("weight_decay", -1.0), ("grad_clip", -1.0),
    ("warmup_steps", -1), ("lr_decay_steps", -2), ("min_learning_rate", -1e-3), ("steps", 0)])
def test_bad_fields_are_one_line_naming_the_field(field, value):
  c = load_config("lm.py:smoke").train
  c[field] = value
  with pytest.raises(ConfigError) as e:
    optimizers.from_config(c)
  message = str(e.value)
  assert message.startswith(f"train.{field}={value!r}: must ") and "\n" not in message, message


def test_the_gan_schedule_field_is_named_in_its_error():
  c = load_config("gan.py:smoke").train
  c.schedule = "cosine2"
  with pytest.raises(ConfigError, match=r"^train\.schedule='cosine2': must be one of 'cosine'"):
    optimizers.from_config(c)

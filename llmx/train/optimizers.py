"""Optimizers and learning-rate schedules chosen by name, and `from_config`, the one place a
config's `train.*` fields become them.

  optimizer   update (g: the clipped gradient, lr: the schedule's learning rate)
  sgd         -lr * g, or with `momentum` m: heavy-ball momentum (m = 0: plain gradient descent)
  adam        Adam (Kingma & Ba 2015), betas (b1, b2)
  adamw       Adam with decoupled weight decay (Loshchilov & Hutter 2019)
  rmsprop     -lr * g / sqrt(EMA of g^2) (decay 0.9), optionally with `momentum`
  adafactor   factored second moments (Shazeer & Stern 2018), optax's defaults

  schedule    learning rate at step i (0-based)
  cosine      nanoGPT's warm-up then cosine decay to `min_learning_rate` (see `warmup_cosine`)
  rsqrt       the Transformer paper's warm-up then 1/sqrt(step) decay (see `rsqrt`)
  linear      (optional warm-up, then) linearly from the peak to 0 at the last step
  constant    (optional warm-up, then) the peak

Weight decay touches matrices only (ndim >= 2): biases, norm scales and other vectors are not
decayed, as in GPT-2 and nanoGPT. adamw decays decoupled from the gradient (p -= lr * wd * p);
adafactor too, at a rate not scaled by the learning rate (optax's `weight_decay_rate`); sgd, adam
and rmsprop add the L2 term `weight_decay * p` to the gradient (PyTorch's convention for its
`weight_decay` argument). Global-norm clipping of the gradient comes first, before any of it.

The transforms are built exactly as the families built them before this module, so the optimizer
state of their checkpoints keeps the same tree (tests/test_optimizers.py checks both).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llmx.train.config_check import (require_choice, require_positive,
                                     require_range)

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")

Schedule = Callable[[int], jax.Array]


# ------------------------------------------------------------------------------------ schedules

def warmup_cosine(peak: float, *, warmup_steps: int, decay_steps: int, end: float) -> Schedule:
  """nanoGPT's schedule: step i < warmup uses peak * (i + 1) / (warmup + 1), so the first update is
  not wasted at lr 0; then cosine from `peak` to `end` at `decay_steps`, flat after."""
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / (warmup_steps + 1), peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(decay_steps, warmup_steps + 1), end_value=end)


def rsqrt(peak: float, warmup_steps: int) -> Schedule:
  """The Transformer paper's schedule, scaled to reach `peak` at the end of the warm-up:
  peak * min(s / warmup, sqrt(warmup / s)) with s = step + 1."""
  warmup = max(warmup_steps, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32) + 1
    return peak * jnp.minimum(s / warmup, jnp.sqrt(warmup / s))
  return schedule


def _with_warmup(peak: float, warmup_steps: int, after: Schedule) -> Schedule:
  """The cosine schedule's warm-up (peak * (i + 1) / (warmup + 1)), then `after` from step 0."""
  ramp = optax.linear_schedule(peak / (warmup_steps + 1), peak, warmup_steps)
  return optax.join_schedules([ramp, after], [warmup_steps])


def lr_schedule(name: str, peak: float, *, steps: int, warmup_steps: int = 0,
                decay_steps: int = 0, min_learning_rate: float = 0.0) -> float | Schedule:
  """The schedule `name` peaking at `peak`, for a run of `steps` updates. decay_steps (cosine
  only): where the cosine ends, 0 = `steps`. "constant" without warm-up is the plain float: optax
  then keeps no step count in the optimizer state (the GAN's checkpoints hold none)."""
  if name == "cosine":
    return warmup_cosine(peak, warmup_steps=warmup_steps, decay_steps=decay_steps or steps,
                         end=min_learning_rate)
  if name == "rsqrt":
    return rsqrt(peak, warmup_steps)
  if name == "linear":
    if not warmup_steps:  # the GAN's schedule, exactly
      return optax.linear_schedule(peak, 0.0, steps)
    return _with_warmup(peak, warmup_steps,
                        optax.linear_schedule(peak, 0.0, max(steps - warmup_steps, 1)))
  if name == "constant":
    return _with_warmup(peak, warmup_steps, optax.constant_schedule(peak)) if warmup_steps else peak
  raise ValueError(f"unknown schedule {name!r}: must be one of {', '.join(map(repr, SCHEDULES))}")


# ----------------------------------------------------------------------------------- optimizers

def matrices(params):
  """The weight-decay mask: True for arrays with ndim >= 2 (a pytree like `params`)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(name: str, learning_rate: float | Schedule, *, momentum: float = 0.0,
              b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.0,
              grad_clip: float = 0.0) -> optax.GradientTransformation:
  """The optimizer `name` (see the module docstring). momentum: sgd and rmsprop only (0: none);
  b1, b2: adam and adamw; grad_clip: the global gradient norm is clipped to it first (0: off)."""
  decay = weight_decay or None
  if name == "adamw":
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=matrices)
  elif name == "adafactor":
    tx = optax.adafactor(learning_rate, weight_decay_rate=decay,
                         weight_decay_mask=matrices if decay else None)
  else:
    if name == "sgd":
      tx = optax.sgd(learning_rate, momentum=momentum or None)
    elif name == "adam":
      tx = optax.adam(learning_rate, b1=b1, b2=b2)
    elif name == "rmsprop":
      tx = optax.rmsprop(learning_rate, momentum=momentum or None)
    else:
      raise ValueError(f"unknown optimizer {name!r}: must be one of "
                       f"{', '.join(map(repr, OPTIMIZERS))}")
    if decay:  # L2: weight_decay * p joins the gradient before the optimizer sees it
      tx = optax.chain(optax.add_decayed_weights(decay, mask=matrices), tx)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx


# ------------------------------------------------------------------------- from a config's train.*

def _fields(t: ml_collections.ConfigDict, steps, learning_rate) -> dict:
  """The fields from_config reads, with defaults for those a family's config lacks."""
  return {
      "optimizer": t.get("optimizer", "adamw"),
      "schedule": t.get("schedule", "cosine"),
      "steps": t.steps if steps is None else steps,
      "learning_rate": t.learning_rate if learning_rate is None else learning_rate,
      "warmup_steps": t.get("warmup_steps", 0),
      "lr_decay_steps": t.get("lr_decay_steps", 0),       # cosine: 0 = decay over the steps
      "min_learning_rate": t.get("min_learning_rate", 0.0),
      "momentum": t.get("momentum", 0.0),
      "beta1": t.get("beta1", 0.9), "beta2": t.get("beta2", 0.999),
      "weight_decay": t.get("weight_decay", 0.0),
      "grad_clip": t.get("grad_clip", 0.0),                # 0: no clipping
  }


def validate(t: ml_collections.ConfigDict, *, steps: int | None = None,
             learning_rate: float | None = None) -> dict:
  """Checks the fields from_config reads; -> them, defaults filled in. A bad one raises a
  one-line ConfigError naming `train.<field>`, its value and what is valid."""
  f = _fields(t, steps, learning_rate)
  c = {"train": f}
  require_choice(c, "train.optimizer", OPTIMIZERS)
  require_choice(c, "train.schedule", SCHEDULES)
  require_positive(c, "train.steps")
  require_positive(c, "train.warmup_steps", "train.lr_decay_steps", allow_zero=True)
  require_range(c, "train.learning_rate", 0.0, float("inf"), low_open=True)
  for field in ("min_learning_rate", "weight_decay", "grad_clip"):
    require_range(c, f"train.{field}", 0.0, float("inf"))
  for field in ("momentum", "beta1", "beta2"):
    require_range(c, f"train.{field}", 0.0, 1.0)
  return f


def from_config(t: ml_collections.ConfigDict, *, steps: int | None = None,
                learning_rate: float | None = None) -> tuple[optax.GradientTransformation, Schedule]:
  """`train.*` -> (optimizer, schedule). Reads train.optimizer (default "adamw"), train.schedule
  (default "cosine"), learning_rate, warmup_steps,
  lr_decay_steps, min_learning_rate, momentum, beta1, beta2, weight_decay and grad_clip, each
  defaulting to "off" when a config lacks it.

  steps, learning_rate: in place of train.steps and train.learning_rate, for a second optimizer
    (the GAN's discriminator makes n_critic updates per step at train.d_learning_rate).
  The schedule is always a function of the step, for logging.
  """
  f = validate(t, steps=steps, learning_rate=learning_rate)
  lr = lr_schedule(f["schedule"], f["learning_rate"], steps=f["steps"],
                   warmup_steps=f["warmup_steps"], decay_steps=f["lr_decay_steps"],
                   min_learning_rate=f["min_learning_rate"])
  tx = optimizer(f["optimizer"], lr, momentum=f["momentum"], b1=f["beta1"], b2=f["beta2"],
                 weight_decay=f["weight_decay"], grad_clip=f["grad_clip"])
  return tx, lr if callable(lr) else optax.constant_schedule(lr)

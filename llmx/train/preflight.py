"""What every run checks before anything is built: the fields all families share and the run folder.

`run.train` calls `check_config` and `check_workdir` before the recipe's own `validate`, so a bad
`train.*`, `sample.*` or `mesh.*` value in any family's config is one line naming the field, its
value and what is valid, before data is read or anything compiles. `check_best_metric` runs once
the experiment is built (it needs the names the eval step returns), still before compilation.
"""
import math
import os
import pathlib
import tempfile

import jax
import ml_collections

from llmx.train import optimizers
from llmx.train.config_check import ConfigError
from llmx.train.mesh import AXES, mesh_shape

# train.<field>: the smallest valid value (every one an integer).
TRAIN_INTEGERS = {
    "steps": 1, "batch_size": 1, "eval_batches": 1, "eval_batch_size": 1, "tokens_per_batch": 1,
    "log_every": 1, "max_checkpoints": 1, "grad_accum_steps": 1, "eval_every": 0,
    "checkpoint_every": 0, "seed": 0, "warmup_steps": 0, "lr_decay_steps": 0,
}
WHY = {
    "max_checkpoints": " (the newest checkpoints kept; 0 would delete every one, the final "
                       "one included)",
}


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train(t: ml_collections.ConfigDict):
  for field, low in TRAIN_INTEGERS.items():
    if field in t and not (_is_int(t[field]) and t[field] >= low):
      raise ConfigError(f"train.{field}={t[field]!r}: must be an integer >= {low}"
                        f"{WHY.get(field, '')}")
  for field in ("learning_rate", "d_learning_rate", "min_learning_rate", "weight_decay",
                "grad_clip", "momentum", "beta1", "beta2", "label_smoothing"):
    if field in t and not _is_number(t[field]):
      raise ConfigError(f"train.{field}={t[field]!r}: must be a finite number")
  optimizers.validate(t)
  if "d_learning_rate" in t:
    optimizers.validate(t, learning_rate=t.d_learning_rate)
  if t.get("min_learning_rate", 0.0) > t.learning_rate:
    raise ConfigError(f"train.min_learning_rate={t.min_learning_rate!r} is above "
                      f"train.learning_rate={t.learning_rate!r}: the schedule would rise; use at "
                      f"most {t.learning_rate!r}")
  length = t.get("lr_decay_steps", 0) or t.steps
  if t.get("warmup_steps", 0) > length:
    what = "train.lr_decay_steps" if t.get("lr_decay_steps", 0) else "train.steps"
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} is longer than {what}={length}: the "
                      f"learning rate would never reach its peak; use at most {length}")
  if "label_smoothing" in t and not 0.0 <= t.label_smoothing < 1.0:
    raise ConfigError(f"train.label_smoothing={t.label_smoothing!r}: must lie in [0, 1)")
  best = t.get("keep_best_metric", "")
  if not isinstance(best, str):
    raise ConfigError(f"train.keep_best_metric={best!r}: must be a metric name such as "
                      f"'val_loss', or '' for none")


def check_sample(s: ml_collections.ConfigDict):
  """The sample printed after training: checked now, not after hours of training."""
  rules = {
      "max_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no sample)"),
      "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: greedy)"),
      "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
      "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
      "min_p": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
      "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
      "prompt": (lambda v: isinstance(v, str), "a string"),
  }
  for field, (ok, valid) in rules.items():
    if field in s and not ok(s[field]):
      raise ConfigError(f"sample.{field}={s[field]!r}: must be {valid}")


def check_mesh(m: ml_collections.ConfigDict, num_devices: int | None = None):
  sizes = {a: m.get(a, 1) for a in AXES}
  mesh_shape(sizes["data"], sizes["fsdp"], sizes["tensor"], expert=sizes["expert"],
             context=sizes["context"],
             num_devices=jax.device_count() if num_devices is None else num_devices)


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """The shared fields of any family's config; raises a one-line ConfigError."""
  check_train(config.train)
  if "sample" in config:
    check_sample(config.sample)
  if "mesh" in config:
    check_mesh(config.mesh, num_devices)


def check_workdir(workdir: str) -> pathlib.Path:
  """The run folder exists (created if missing) and this process can write in it."""
  if not workdir:
    raise ConfigError("--workdir is empty: name the run folder")
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir={workdir}: is a file, not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".llmx-write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); pick a "
                      f"writable folder") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: not writable; pick a writable folder")
  return path


def check_best_metric(name: str, produced) -> None:
  """train.keep_best_metric names a metric the evaluation produces (checked before the run, not
  discovered when no checkpoint ever qualifies as best)."""
  produced = sorted(set(produced))
  if name and name not in produced:
    raise ConfigError(f"train.keep_best_metric={name!r}: the evaluation never produces it; "
                      f"choose one of {', '.join(map(repr, produced))} or '' for none")

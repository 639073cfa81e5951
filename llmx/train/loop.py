"""The training loop every experiment shares: resume, step, log, evaluate, checkpoint.

It takes a `Trainable` (init, train step, eval step as pure functions) and a grain dataset of
batches indexed by step; it knows no model family.
"""
import dataclasses
import logging
import pathlib
import signal
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
from flax import nnx

from llmx.errors import LlmxError
from llmx.train import mesh as mesh_lib
from llmx.train.checkpoint import Checkpointer, config_differences
from llmx.train.config_check import ConfigError
from llmx.train.metrics import MetricsWriter
from llmx.train.step import Trainable

log = logging.getLogger("llmx")


class NonFiniteLossError(LlmxError, FloatingPointError):
  pass


@dataclasses.dataclass
class LoopOptions:
  steps: int
  eval_every: int = 0           # 0: evaluate only at the end
  checkpoint_every: int = 0     # 0: checkpoint only at the end
  log_every: int = 10
  max_to_keep: int = 3
  tokens_per_step: int = 0      # for tokens/s
  flops_per_step: float = 0.0   # analytic model FLOPs of one step, for MFU
  peak_flops: float = 0.0       # the devices' total peak FLOP/s; 0: no MFU column


@dataclasses.dataclass
class TrainResult:
  model: nnx.Module             # the trained model (params merged back)
  state: dict
  step: int
  history: list                 # every logged metrics dict
  preempted: bool = False


class _Preemption:
  """SIGTERM (a preempted pod worker) asks the loop to checkpoint and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(trainable: Trainable, *, train_batches: grain.MapDataset, eval_batches: list,
          workdir: str, meta: dict, options: LoopOptions, mesh: jax.sharding.Mesh | None = None,
          schedule: Callable[[int], float] | None = None,
          on_eval: Callable[[nnx.Module, int], dict] | None = None) -> TrainResult:
  """Trains for `options.steps` steps, resuming from `workdir/checkpoints` if present.

  meta: JSON-serialisable run description saved with every checkpoint. Its `must_match` entry
    (e.g. the model config and tokenizer) must equal the checkpoint's to resume; otherwise the
    differing fields are reported.
  train_batches[i]: this process's rows of global batch i (numpy); eval_batches: the same,
    evaluated in full at each evaluation.
  schedule: the learning-rate schedule, logged as `learning_rate`.
  on_eval(model, step): extra evaluation metrics, computed at each evaluation.
  """
  mesh = mesh or mesh_lib.make_mesh(devices=jax.devices())
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=options.max_to_keep)
  saved_meta = ckpt.latest_meta()
  if saved_meta is not None:
    diffs = config_differences(saved_meta.get("must_match", {}), meta.get("must_match", {}))
    if diffs:
      raise ConfigError(f"{workdir} holds a checkpoint made by an incompatible config; "
                        f"differences: {'; '.join(diffs)}. Use another --workdir or the old config.")

  replicated = mesh_lib.replicated(mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  state = jax.jit(trainable.init, out_shardings=replicated)()

  data_iter = iter(train_batches)
  start_step = 0
  restored = ckpt.restore(jax.eval_shape(lambda: state), data_iter)
  if restored is not None:
    start_step, state, _ = restored
    state = jax.device_put(state, replicated)
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
  if start_step >= options.steps:
    log.info("checkpoint step %d >= train.steps=%d: nothing to train", start_step, options.steps)

  train_step = jax.jit(trainable.train_step, donate_argnums=0)
  eval_step = jax.jit(trainable.eval_step)
  writer = MetricsWriter(workdir, resume_step=start_step)
  history = []

  def evaluate(step):
    sums = {}
    for batch in eval_batches:
      for name, value in eval_step(state, mesh_lib.global_batch(batch, batch_sharding)).items():
        sums[name] = sums.get(name, 0.0) + float(value)
    metrics = {f"val_{k}": v / len(eval_batches) for k, v in sums.items()}
    if on_eval is not None:
      metrics.update(on_eval(trainable.model_of(state), step))
    return metrics

  def check_finite():
    bad = int(state["nonfinite_step"])
    if bad >= 0:
      raise NonFiniteLossError(
          f"the training loss became NaN or Inf at step {bad}; stopping without saving over the "
          f"last good checkpoint (steps {ckpt.steps()} in {ckpt.directory}). Lower "
          f"train.learning_rate or check the data.")

  def save(step):
    check_finite()
    ckpt.save(step, state, meta, data_iter)

  step, preempted = start_step, False
  interval_start, interval_steps = time.perf_counter(), 0
  with _Preemption() as preemption:
    try:
      while step < options.steps:
        batch = mesh_lib.global_batch(next(data_iter), batch_sharding)
        state, metrics = train_step(state, batch)
        step += 1
        interval_steps += 1
        is_last = step == options.steps
        if step % options.log_every == 0 or is_last:
          logged = {k: float(v) for k, v in metrics.items()}
          elapsed = time.perf_counter() - interval_start
          logged["step_time_ms"] = 1e3 * elapsed / interval_steps
          if options.tokens_per_step:
            logged["tokens_per_s"] = options.tokens_per_step * interval_steps / elapsed
            logged["tokens_per_s_per_device"] = logged["tokens_per_s"] / jax.device_count()
          if options.flops_per_step and options.peak_flops:
            logged["mfu"] = options.flops_per_step * interval_steps / elapsed / options.peak_flops
          if schedule is not None:
            logged["learning_rate"] = float(schedule(step - 1))
          check_finite()
          if options.eval_every and step % options.eval_every == 0 or is_last:
            logged.update(evaluate(step))
          writer.write(step, logged)
          history.append({"step": step, **logged})
          log.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in logged.items()))
          interval_start, interval_steps = None, 0
        if options.checkpoint_every and step % options.checkpoint_every == 0 or is_last:
          save(step)
        if interval_start is None:  # evaluation and saving stay out of the tokens/s figures
          interval_start = time.perf_counter()
        if preemption.requested:
          log.warning("SIGTERM received: checkpointing step %d and stopping", step)
          save(step)
          preempted = True
          break
    finally:
      ckpt.close()
      writer.close()
  return TrainResult(model=trainable.model_of(state), state=state, step=step, history=history, preempted=preempted)


def _fmt(v: float) -> str:
  if abs(v) >= 1e4:
    return f"{v:,.0f}"
  return f"{v:.4g}"

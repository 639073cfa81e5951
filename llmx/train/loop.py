"""The training loop every experiment shares: resume, step, log, evaluate, checkpoint.

It takes a `Trainable` (init, train step, eval step as pure functions) and a grain dataset of
batches indexed by step; it knows no model family.
"""
import dataclasses
import logging
import pathlib
import signal
import time
from typing import Callable

import grain
import jax
from flax import nnx

from llmx.errors import LlmxError
from llmx.train import mesh as mesh_lib
from llmx.train import metrics as metrics_lib
from llmx.train import sharding as sharding_lib
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
  max_to_keep: int = 3          # the newest checkpoints kept
  best_metric: str = ""         # also keep the checkpoint with the best value of this metric
  best_mode: str = "min"        # ... lowest ("min", e.g. val_loss) or highest ("max")
  tokens_per_step: int = 0      # for tokens/s
  flops_per_step: float = 0.0   # analytic model FLOPs of one step, for MFU
  peak_flops: float = 0.0       # the devices' total peak FLOP/s; 0: looked up (metrics.peak_flops)
  eval_at_start: bool = False   # a fresh run also evaluates before its first step (logged as step 0)


@dataclasses.dataclass
class TrainResult:
  model: nnx.Module             # the trained model (params merged back)
  state: dict
  step: int
  history: list                 # every logged metrics dict
  preempted: bool = False
  final: dict = dataclasses.field(default_factory=dict)  # the recipe's finish() report, if any


class _Preemption:
  """SIGTERM (a preempted pod worker) asks the loop to checkpoint and stop at the next step.

  With several processes, JAX's distributed runtime already listens for SIGTERM and agrees on a
  step where every process stops (`reached_preemption_sync_point`), so that all of them save the
  same step; alone, a Python signal handler does it.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._multiprocess:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this runtime
        return False
    return self._requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(trainable: Trainable, *, train_batches: grain.MapDataset, eval_batches: list,
          workdir: str, meta: dict, options: LoopOptions, mesh: jax.sharding.Mesh | None = None,
          schedule: Callable[[int], float] | None = None,
          on_eval: Callable[[nnx.Module, int], dict] | None = None,
          rules: dict | None = None,
          resume_hints: Callable[[list[str]], str] | None = None,
          may_change: tuple[str, ...] = ()) -> TrainResult:
  """Trains for `options.steps` steps, resuming from `workdir/checkpoints` if present.

  meta: JSON-serialisable run description saved with every checkpoint. Its `must_match` entry
    (e.g. the model config and tokenizer) must equal the checkpoint's to resume; otherwise the
    differing fields are reported.
  train_batches[i]: this process's rows of global batch i (numpy, or a pytree of them; see
    mesh.data_shard); eval_batches: the same, evaluated in full at each evaluation.
  mesh: default all devices, data parallel. rules: logical axis -> mesh axis for the state
    (default: sharding.RULES for the mesh's strategy).
  schedule: the learning-rate schedule, logged as `learning_rate`.
  on_eval(model, step): extra evaluation metrics, computed at each evaluation.
  resume_hints(differences): advice appended to the error when meta["must_match"] differs.
  may_change: dotted names in meta["must_match"] (e.g. "train.batch_size") left out of that check.

  The state is created already sharded (`jax.eval_shape(init)`, then `jax.jit(init,
  out_shardings=...)`), or restored onto this mesh whatever mesh saved it. Every process runs
  this function; only process 0 writes metrics.
  """
  mesh = mesh or mesh_lib.make_mesh(devices=jax.devices())
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=options.max_to_keep,
                      best_metric=options.best_metric or None, best_mode=options.best_mode,
                      clean_up_unfinished=True)
  abstract_state = jax.eval_shape(trainable.init)
  checkpointed = lambda tree: {k: v for k, v in tree.items() if k not in trainable.unsaved}
  meta = dict(meta, state_structure=state_structure(checkpointed(abstract_state)))
  saved_meta = ckpt.latest_meta()
  if saved_meta is not None:
    try:
      check_resumable(saved_meta, meta, workdir, resume_hints, may_change)
    except ConfigError:
      ckpt.close()
      raise

  replicated = mesh_lib.replicated(mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, rules)

  data_iter = iter(train_batches)
  start_step = 0
  try:
    restored = ckpt.restore(sharding_lib.with_shardings(checkpointed(abstract_state),
                                                        checkpointed(state_sharding)),
                            data_iter)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    start_step, state, _ = restored
    if trainable.unsaved:  # e.g. frozen base weights: rebuilt, never saved
      fresh = jax.jit(trainable.init, out_shardings=state_sharding)()
      state = dict(state, **{k: fresh[k] for k in trainable.unsaved})
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
  else:
    state = jax.jit(trainable.init, out_shardings=state_sharding)()
  log.info("%s", sharding_lib.describe(state, mesh))
  if start_step >= options.steps:
    log.info("checkpoint step %d >= train.steps=%d: nothing to train", start_step, options.steps)

  # Shardings pinned in and out, so the state keeps its layout step after step; the old state's
  # buffers are donated to the new one.
  train_step = jax.jit(trainable.train_step, donate_argnums=0,
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated))
  eval_step = jax.jit(trainable.eval_step, in_shardings=(state_sharding, batch_sharding),
                      out_shardings=replicated)
  peak_flops = options.peak_flops
  if options.flops_per_step and not peak_flops:
    peak_flops = metrics_lib.peak_flops(jax.devices())
  writer = MetricsWriter(workdir, resume_step=start_step)
  history = []
  eval_arrays = []

  def evaluate(step):
    if not eval_arrays:  # the same batches every time: placed once
      eval_arrays.extend(mesh_lib.global_batch(b, batch_sharding) for b in eval_batches)
    sums = {}
    for batch in eval_arrays:
      for name, value in eval_step(state, batch).items():
        sums[name] = sums.get(name, 0.0) + float(value)
    metrics = {f"val_{k}": v / len(eval_arrays) for k, v in sums.items()}
    if on_eval is not None:
      metrics.update(on_eval(trainable.model_of(state), step))
    return metrics

  def check_finite():
    bad = int(state["nonfinite_step"])
    if bad >= 0:
      saved = ckpt.steps()
      last = (f"the last good checkpoint is step {saved[-1]} in {ckpt.directory}" if saved else
              "no checkpoint was saved")
      raise NonFiniteLossError(
          f"the training loss or the updated parameters became NaN or Inf at step {bad}; stopped "
          f"without saving that state ({last}). Lower train.learning_rate, set train.grad_clip "
          f"or check the data.")

  def save(step, logged):
    check_finite()
    if not bool(all_finite(checkpointed(state))):  # an update can overflow from finite inputs
      state["nonfinite_step"] = jax.numpy.asarray(step)
      check_finite()
    ckpt.save(step, checkpointed(state), meta, data_iter, metrics=logged)

  step, preempted = start_step, False
  if options.eval_at_start and start_step == 0:
    before = evaluate(0)
    writer.write(0, before)
    history.append({"step": 0, **before})
    log.info("step 0 (before training) | %s", " | ".join(f"{k} {_fmt(v)}" for k, v in before.items()))
  interval_start, interval_steps = time.perf_counter(), 0
  with _Preemption() as preemption:
    try:
      while step < options.steps:
        batch = mesh_lib.global_batch(next(data_iter), batch_sharding)
        state, metrics = train_step(state, batch)
        step += 1
        interval_steps += 1
        is_last = step == options.steps
        logged = None
        if step % options.log_every == 0 or is_last:
          logged = {k: float(v) for k, v in metrics.items()}
          elapsed = time.perf_counter() - interval_start
          logged["step_time_ms"] = 1e3 * elapsed / interval_steps
          if options.tokens_per_step:
            logged["tokens_per_s"] = options.tokens_per_step * interval_steps / elapsed
            logged["tokens_per_s_per_device"] = logged["tokens_per_s"] / jax.device_count()
          if options.flops_per_step and peak_flops:
            logged["mfu"] = options.flops_per_step * interval_steps / elapsed / peak_flops
          if schedule is not None:
            logged["learning_rate"] = float(schedule(step - 1))
          check_finite()
          if options.eval_every and step % options.eval_every == 0 or is_last:
            logged.update(evaluate(step))
          writer.write(step, logged)
          history.append({"step": step, **logged})
          log.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in logged.items()))
          interval_start, interval_steps = None, 0
        saved = options.checkpoint_every and step % options.checkpoint_every == 0 or is_last
        if saved:
          save(step, logged)
        if preemption.reached(step) and not is_last:
          log.warning("SIGTERM received: checkpointing step %d and stopping", step)
          if not saved:
            save(step, logged)
          preempted = True
          break
        if interval_start is None:  # evaluation and saving stay out of the tokens/s figures
          interval_start = time.perf_counter()
    finally:
      ckpt.close()
      writer.close()
  return TrainResult(model=trainable.model_of(state), state=state, step=step, history=history,
                     preempted=preempted)


@jax.jit
def all_finite(tree):
  """Whether every floating-point array of `tree` is free of NaN and Inf (one device reduction
  per array, run only before a save)."""
  leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def state_structure(abstract_state) -> dict:
  """The checkpointed state's layout: how many arrays, and a digest of their paths, shapes and
  dtypes. A config change that reshapes it (the optimizer, grad_clip on or off, the model) makes
  the saved checkpoints unreadable by this run, which is a config error, not damage."""
  import hashlib
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  text = "\n".join(f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {x.dtype}" for p, x in leaves)
  return dict(arrays=len(leaves), sha256=hashlib.sha256(text.encode()).hexdigest()[:16])


def check_resumable(saved: dict, meta: dict, workdir: str, hints=None, may_change=()):
  """Raises a ConfigError naming what changed when this run cannot resume the saved one."""
  def pinned(must_match: dict, keep) -> dict:
    out = {}
    for key, value in must_match.items():
      if not keep(key):
        continue
      if isinstance(value, dict):
        value = {k: v for k, v in value.items() if f"{key}.{k}" not in may_change}
      out[key] = value
    return out
  saved_pins = pinned(saved.get("must_match", {}), lambda k: True)
  # Entries a checkpoint written before they existed lacks are not compared.
  current = pinned(meta.get("must_match", {}), lambda k: k in saved_pins)
  diffs = config_differences(saved_pins, current)
  if diffs:
    hint = hints(diffs) if hints else ""
    raise ConfigError(f"{workdir} holds a checkpoint made by an incompatible config; differences: "
                      f"{'; '.join(diffs)}. {hint + '. ' if hint else ''}Use another --workdir or "
                      f"the old config.")
  if "state_structure" in saved and saved["state_structure"] != meta["state_structure"]:
    changed = config_differences(saved.get("config", {}), meta.get("config", {}))
    raise ConfigError(
        f"the checkpoints in {workdir} hold a train state of another structure "
        f"({saved['state_structure']['arrays']} arrays saved, {meta['state_structure']['arrays']} "
        f"now): the config changed in {'; '.join(changed[:8]) if changed else 'no field the run saved'}"
        f". The checkpoints are intact: re-run with the saved values or use another --workdir.")


def _fmt(v: float) -> str:
  if abs(v) >= 1e4:
    return f"{v:,.0f}"
  return f"{v:.4g}"

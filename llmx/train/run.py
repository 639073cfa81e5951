"""One run of any recipe: check, build the mesh and the experiment, train, finish.

The checks every family's config passes through happen here, in this order, before anything is
built: the shared fields (`preflight.check_config`), the recipe's own `validate`, the run folder
(`preflight.check_workdir`, then the one-writer lock), and once the experiment exists but before
anything compiles, `train.keep_best_metric` against the metrics the evaluation returns.
"""
import jax
import ml_collections

from llmx.errors import Preempted
from llmx.train import loop, preflight, run_lock
from llmx.train.mesh import mesh_from_config
from llmx.train.recipe import Experiment, Recipe

# The fields whose change on resume is an error unless train.allow_batch_size_change is set.
BATCH_FIELDS = ("batch_size", "tokens_per_batch")
# Schedules whose shape depends on their length (train.lr_decay_steps, else train.steps).
LENGTH_SCHEDULES = ("cosine", "linear")


def loop_options(t: ml_collections.ConfigDict, **extra) -> loop.LoopOptions:
  """The loop's options from the common `train.*` fields."""
  return loop.LoopOptions(
      steps=t.steps, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
      log_every=t.log_every, max_to_keep=t.max_checkpoints,
      best_metric=t.get("keep_best_metric", ""), eval_at_start=t.get("eval_at_start", False),
      **extra)


def resume_contract(t: ml_collections.ConfigDict) -> dict:
  """The `train.*` values a resumed run must keep (saved in meta["must_match"]["train"]).

  The learning-rate schedule's length is part of the run: training on with a larger train.steps
  would otherwise restart the cosine decay from a higher rate. To train past a finished schedule,
  keep its length with train.lr_decay_steps (the rate then stays at its floor).
  """
  contract = {f: t[f] for f in BATCH_FIELDS if f in t}
  if t.get("schedule", "cosine") in LENGTH_SCHEDULES:
    contract["lr_schedule_steps"] = t.get("lr_decay_steps", 0) or t.steps
  return contract


def resume_hints(differences: list[str]) -> str:
  """What to do about the differences `loop.train` found between a checkpoint and this run."""
  hints = []
  for line in differences:
    name = line.split(":")[0]
    if name == "train.lr_schedule_steps":
      saved = line.split(":")[1].split()[0]
      hints.append(f"train.steps sets the learning-rate schedule's length: to train on past the "
                   f"saved schedule keep it with --config.train.lr_decay_steps={saved}")
    elif name.split(".")[-1] in BATCH_FIELDS:
      hints.append("to change the batch size of a run on purpose pass "
                   "--config.train.allow_batch_size_change=True")
  return "; ".join(h[0].upper() + h[1:] for h in hints)


def metric_names(exp: Experiment) -> set[str]:
  """The metrics an evaluation logs, from the eval step's output structure (no computation)."""
  names = set(exp.eval_metrics)
  if exp.eval_batches:
    abstract = jax.eval_shape(exp.trainable.init)
    names |= {f"val_{k}" for k in jax.eval_shape(exp.trainable.eval_step, abstract,
                                                  exp.eval_batches[0])}
  return names


def train(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str) -> loop.TrainResult:
  """Trains `recipe` on `config` in `workdir` (resuming from its checkpoints).

  Raises `llmx.errors.Preempted` (exit status 143 from an entry point) when SIGTERM stopped the
  run after saving, so that a scheduler sees an unfinished job.
  """
  preflight.check_config(config)
  recipe.validate(config)
  preflight.check_workdir(workdir)
  mesh = mesh_from_config(config.mesh)
  with run_lock.held(workdir):
    exp = recipe.experiment(config, mesh, workdir)
    best = config.train.get("keep_best_metric", "")
    if best:
      preflight.check_best_metric(best, metric_names(exp))
    meta = dict(exp.meta)
    meta.setdefault("config", config.to_dict())
    meta["must_match"] = dict(meta.get("must_match", {}), train=resume_contract(config.train))
    result = loop.train(
        exp.trainable, mesh=mesh, schedule=exp.schedule, rules=exp.rules,
        train_batches=exp.train_batches, eval_batches=exp.eval_batches, workdir=workdir,
        meta=meta, on_eval=exp.evaluate, resume_hints=resume_hints,
        may_change=tuple(f"train.{f}" for f in BATCH_FIELDS)
        if config.train.get("allow_batch_size_change", False) else (),
        options=loop_options(config.train, best_mode=exp.best_mode,
                             tokens_per_step=exp.tokens_per_step,
                             flops_per_step=exp.flops_per_step))
    if exp.finish is not None:
      result.final = exp.finish(result) or {}
  if result.preempted:
    raise Preempted(f"SIGTERM: saved step {result.step} in {workdir}/checkpoints and stopped; "
                    f"re-run the same command to resume")
  return result

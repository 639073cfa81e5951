"""One run of any recipe: validate, build the mesh and the experiment, train, finish."""
import ml_collections

from llmx.train import loop
from llmx.train.mesh import mesh_from_config
from llmx.train.recipe import Recipe


def loop_options(t: ml_collections.ConfigDict, **extra) -> loop.LoopOptions:
  """The loop's options from the common `train.*` fields."""
  return loop.LoopOptions(
      steps=t.steps, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
      log_every=t.log_every, max_to_keep=t.max_checkpoints,
      best_metric=t.get("keep_best_metric", ""), eval_at_start=t.get("eval_at_start", False),
      **extra)


def train(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str) -> loop.TrainResult:
  """Trains `recipe` on `config` in `workdir` (resuming from its checkpoints)."""
  recipe.validate(config)
  mesh = mesh_from_config(config.mesh)
  exp = recipe.experiment(config, mesh, workdir)
  result = loop.train(
      exp.trainable, mesh=mesh, schedule=exp.schedule, rules=exp.rules,
      train_batches=exp.train_batches, eval_batches=exp.eval_batches, workdir=workdir,
      meta=exp.meta, on_eval=exp.evaluate,
      options=loop_options(config.train, best_mode=exp.best_mode,
                           tokens_per_step=exp.tokens_per_step,
                           flops_per_step=exp.flops_per_step))
  if exp.finish is not None:
    result.final = exp.finish(result) or {}
  return result

"""The recipe contract: how the one training loop runs any model family.

A family's recipe turns a config into an `Experiment`: the `Trainable` (state init, train and eval
steps as pure functions; `step.supervised` builds it for one model and one loss, a GAN builds its
two-optimizer step itself), the data, the evaluators and the run description saved with every
checkpoint. `run.train(recipe, config, workdir)` then does the rest: the mesh, the loop, resume,
logging, checkpoints. The smallest complete example is `llmx/families/mlp/recipe.py`.
"""
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from llmx.train.step import Trainable


@dataclasses.dataclass
class Experiment:
  """Everything the loop needs for one run."""
  trainable: Trainable
  train_batches: Any                     # grain.MapDataset: item i = this process's rows of batch i
  eval_batches: list                     # evaluated in full at each evaluation
  meta: dict                             # saved with each checkpoint; meta["must_match"] must match to resume
  schedule: Callable[[int], float] | None = None       # the learning rate, logged as learning_rate
  evaluate: Callable[[nnx.Module, int], dict] | None = None  # (eval-mode model, step) -> metrics
  eval_metrics: tuple[str, ...] = ()     # the names `evaluate` returns (for train.keep_best_metric)
  tokens_per_step: int = 0               # for tokens/s
  flops_per_step: float = 0.0            # for MFU
  rules: dict | None = None              # logical axis -> mesh axis, when not the mesh's default
  best_mode: str = "min"                 # whether train.keep_best_metric is best low or high
  finish: Callable[[Any], dict | None] | None = None  # (loop.TrainResult) -> report, after training


@dataclasses.dataclass(frozen=True)
class Recipe:
  """validate(config) raises ConfigError before anything is built; experiment(config, mesh,
  workdir) builds the run."""
  name: str
  validate: Callable[[ml_collections.ConfigDict], None]
  experiment: Callable[[ml_collections.ConfigDict, jax.sharding.Mesh, str], Experiment]

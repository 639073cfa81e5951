"""The MLP classifier's recipe: the smallest complete example of the recipe contract
(llmx/train/recipe.py), to read before writing a family.

A family gives the loop a `Recipe(name, validate, experiment)`:

  validate(config)                    checks every field it reads, raising a one-line ConfigError
                                      (field, value, what is valid) before anything is built;
  experiment(config, mesh, workdir)   builds an `Experiment`: the Trainable (state init, train and
                                      eval steps; `step.supervised` makes it from a model and a
                                      loss), the batches, the evaluation and the metadata saved
                                      with each checkpoint.

`llmx.train.run.train(RECIPE, config, workdir)` does the rest: the mesh, the loop, logging to
WORKDIR/metrics.jsonl and TensorBoard, checkpoints, resuming.
"""
import functools

import jax.numpy as jnp
import ml_collections
from flax import nnx

from llmx.families.mlp import data as data_lib
from llmx.families.mlp.model import ACTIVATIONS, MLPClassifier
from llmx.train import losses, optimizers
from llmx.train.config_check import ConfigError, require_choice, require_positive, require_range
from llmx.train.mesh import batch_parallelism, check_batch_size, process_rows
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised


def validate(c: ml_collections.ConfigDict):
  """Every field experiment() reads, checked before anything is built or compiled."""
  if c.data.path:
    raise ConfigError(f"data.path={c.data.path!r}: this family reads scikit-learn's bundled "
                      f"breast-cancer set; leave data.path empty")
  require_range(c, "data.test_fraction", 0.0, 1.0, low_open=True)
  require_choice(c, "model.activation", tuple(ACTIVATIONS))
  require_positive(c, "model.hidden", "train.steps", "train.batch_size", "train.log_every",
                   "train.max_checkpoints")
  require_positive(c, "train.eval_every", "train.checkpoint_every", "train.seed", "data.split_seed",
                   allow_zero=True)
  optimizers.validate(c.train)  # train.optimizer, learning_rate, schedule, momentum, ...


def loss_fn(model: MLPClassifier, batch: dict):
  """The loss `supervised` differentiates, with the metrics to log beside it.
  batch: {x float [batch, features], y float [batch] of 0/1} -> (loss, {accuracy})."""
  logits = model(batch["x"])
  accuracy = jnp.mean((logits > 0) == (batch["y"] > 0.5))
  return losses.binary_cross_entropy(logits, batch["y"]), dict(accuracy=accuracy)


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  del workdir  # the loop writes there; this family keeps nothing else
  split = data_lib.load_breast_cancer(test_fraction=c.data.test_fraction, seed=c.data.split_seed)
  if c.train.batch_size > len(split.x_train):
    raise ConfigError(f"train.batch_size={c.train.batch_size} is more than the "
                      f"{len(split.x_train)} training rows")
  check_batch_size(mesh, c.train.batch_size)  # each device gets an equal share of a batch
  if len(split.x_test) % batch_parallelism(mesh):
    raise ConfigError(f"data.test_fraction={c.data.test_fraction} leaves {len(split.x_test)} "
                      f"held-out rows, which do not split evenly over the mesh's "
                      f"{batch_parallelism(mesh)} data-parallel devices")

  # The model as a builder: the loop calls it inside jit, so the parameters are created already
  # placed on the mesh. The initialisation is fixed by train.seed.
  build = lambda: MLPClassifier(split.x_train.shape[1], c.model.hidden, c.model.activation,
                                rngs=nnx.Rngs(params=c.train.seed))
  tx, schedule = optimizers.from_config(c.train)
  trainable = supervised(build, tx, loss_fn)
  heldout = {"x": split.x_test, "y": split.y_test}

  def finish(result) -> dict:
    """The held-out accuracy of the final model, printed: the run's one-line result. Computed
    from the final state, so a run resumed with nothing left to train still reports it."""
    metrics = trainable.eval_step(result.state, heldout)
    report = {"heldout_accuracy": float(metrics["accuracy"]), "heldout_loss": float(metrics["loss"])}
    print(f"held-out accuracy {report['heldout_accuracy']:.4f} ({len(split.x_test)} tumours), "
          f"loss {report['heldout_loss']:.4f}, after {result.step} steps", flush=True)
    return report

  # Each process keeps only the rows of each batch that its own devices hold.
  this_process = functools.partial(process_rows, mesh=mesh)
  return Experiment(
      trainable=trainable,
      train_batches=data_lib.batches(split.x_train, split.y_train, batch_size=c.train.batch_size,
                                     seed=c.train.seed).map(this_process),
      # The whole held-out split as one batch: eval_step gives its loss and accuracy, logged as
      # val_loss and val_accuracy at each evaluation.
      eval_batches=[this_process(heldout)],
      # must_match: what a checkpoint must agree on to be resumed; config: saved for the record.
      meta=dict(must_match=dict(model=c.model.to_dict(), data=c.data.to_dict()), config=c.to_dict()),
      schedule=schedule,  # logged as learning_rate
      best_mode="max",    # train.keep_best_metric=val_accuracy keeps the most accurate checkpoint
      finish=finish)


RECIPE = Recipe("mlp", validate, experiment)

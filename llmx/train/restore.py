"""Restore a trained model for inference from a run folder, for any family."""
import pathlib
from typing import Callable

import jax
from flax import nnx

from llmx.train.checkpoint import Checkpointer
from llmx.train.config_check import ConfigError
from llmx.train.step import Trainable


def for_inference(workdir: str, trainable_from_meta: Callable[[dict], Trainable]
                  ) -> tuple[nnx.Module, dict, int]:
  """-> (model in eval mode, the checkpoint's meta, step) from the newest readable checkpoint.

  trainable_from_meta(meta): the family rebuilds the Trainable the run trained (model and
    optimizer, from the meta its recipe saved), so the checkpoint's state tree can be read.
  Reads only: the run folder is neither created nor changed.
  """
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ConfigError(f"--workdir={workdir!r}: no checkpoints folder at {directory}")
  ckpt = Checkpointer(directory, async_save=False, read_only=True)
  try:
    meta = ckpt.latest_meta()
    if meta is None:
      raise ConfigError(f"--workdir={workdir!r}: no checkpoint under {ckpt.directory}")
    trainable = trainable_from_meta(meta)
    abstract = jax.eval_shape(trainable.init)
    step, state, _ = ckpt.restore({k: v for k, v in abstract.items() if k not in trainable.unsaved})
    if trainable.unsaved:  # rebuilt from the base checkpoint, not saved with the run
      fresh = trainable.init()
      state = dict(state, **{k: fresh[k] for k in trainable.unsaved})
  finally:
    ckpt.close()
  return trainable.model_of(state), meta, step

"""Orbax checkpoints of the train state, the run's metadata and the grain iterator.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous step intact; a step that is there but cannot be read is reported
and the one before it is used.
"""
import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from llmx.errors import LlmxError

log = logging.getLogger(__name__)


class CheckpointError(LlmxError, RuntimeError):
  pass


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree):
  """Typed PRNG keys (NNX's dropout streams) are stored as their raw uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(abstract_tree):
  def leaf(x):
    if _is_key(x):
      return jax.eval_shape(jax.random.key_data, x)
    return x
  return jax.tree.map(leaf, abstract_tree)


def _from_storable(tree, abstract_tree):
  # The key dtype of the abstract leaf carries the PRNG implementation (threefry, rbg, ...).
  return jax.tree.map(lambda x, a: jax.random.wrap_key_data(x, impl=a.dtype._impl)
                      if _is_key(a) else x, tree, abstract_tree)


class Checkpointer:
  """`DIR/checkpoints/<step>/{state, meta, data}`: state is the pytree, meta a JSON dict (the run's
  config and tokenizer), data the grain iterator's position for each process."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The metadata of the newest readable checkpoint, without touching its arrays."""
    for step in reversed(self.steps()):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001 - any failure here means this step is unusable
        log.error("checkpoint %s: metadata unreadable (%s); trying an older one", step, e)
    return None

  def save(self, step: int, state, meta: dict, data_iterator: grain.DatasetIterator | None = None):
    items = dict(state=ocp.args.StandardSave(_to_storable(state)), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iterator: grain.DatasetIterator | None = None):
    """Newest readable checkpoint as (step, state, meta), or None when there is none.

    A damaged step is logged with its error and skipped; if steps exist but none is readable,
    that is an error rather than a silent fresh start over the user's checkpoints.
    """
    steps = self.steps()
    for step in reversed(steps):
      items = dict(state=ocp.args.StandardRestore(_abstract_storable(abstract_state)),
                   meta=ocp.args.JsonRestore())
      if data_iterator is not None and (self.directory / str(step) / "data").exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001
        log.error("checkpoint %s in %s is damaged or incomplete and was not loaded: %s: %s",
                  step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
        continue
      return step, _from_storable(restored["state"], abstract_state), restored["meta"]
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be read")
    return None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Human-readable differences between two nested config dicts: ['model.d_model: 128 -> 256']."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} in the checkpoint, {b!r} now")
  return out

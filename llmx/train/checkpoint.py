"""Orbax checkpoints of the train state, the run's metadata and the grain iterator.

`DIR/checkpoints/<step>/{state, meta, integrity, data}`. Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save (SIGKILL included) leaves the steps
before it intact, and the leftover temporary folder is removed at the next start. Each save also
records a fingerprint of every array (a position-weighted sum of its bits, exact whatever the
sharding); a step whose files cannot be read or whose arrays do not match their fingerprints is
reported, moved to `DIR/damaged_checkpoints/`, and the step before it is used: never a traceback
from inside orbax, never a silent partial load.

Every process calls save and restore (orbax coordinates the writes: each process writes its own
shards, process 0 the metadata); the data iterator's position is stored per process, and also in
the integrity record, so a data position that reads back changed is caught like a changed array.
A save that fails because the disk is full is one line naming the last good checkpoint.
"""
import errno
import functools
import json
import logging
import pathlib
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from llmx.errors import LlmxError

log = logging.getLogger("llmx")


class CheckpointError(LlmxError, RuntimeError):
  pass


def _disk_full(e: BaseException) -> bool:
  """Whether `e` (or what caused it, inside orbax's and tensorstore's wrappers) is ENOSPC."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree):
  """Typed PRNG keys (NNX's dropout streams) are stored as their raw uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(abstract_tree):
  """Keys as their data; a leaf without a sharding is restored whole onto the first local device
  (orbax needs a target whatever mesh wrote the checkpoint)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_key_data_sharding(x) or default)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or default)
  return jax.tree.map(leaf, abstract_tree)


def _key_data_sharding(abstract_key):
  sharding = getattr(abstract_key, "sharding", None)
  if isinstance(sharding, NamedSharding):  # key data has one more (unsplit) dimension
    return NamedSharding(sharding.mesh, P(*sharding.spec, None))
  return sharding


def _from_storable(tree, abstract_tree):
  # The key dtype of the abstract leaf carries the PRNG implementation (threefry, rbg, ...).
  return jax.tree.map(lambda x, a: jax.random.wrap_key_data(x, impl=a.dtype._impl)
                      if _is_key(a) else x, tree, abstract_tree)


def _bits(x):
  """The raw bits of x as uint32, elementwise (64-bit types gain a trailing dimension of 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_fingerprint(x):
  """sum_i bits[i] * (2i + 1) mod 2**32: integer arithmetic, so the same for any sharding and
  reduction order; a changed, lost or moved element changes it."""
  bits = _bits(x)
  index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for d in reversed(range(bits.ndim)):  # the flat index without reshaping the sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[d]
  return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def fingerprints(storable_tree) -> list[int]:
  """One uint32 fingerprint per array of the tree, in flattening order."""
  leaves = jax.tree.leaves(storable_tree)
  if not leaves:
    return []
  shardings = [getattr(x, "sharding", None) for x in leaves]
  mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
  out_sharding = NamedSharding(mesh, P()) if mesh is not None else None
  return [int(v) for v in jax.device_get(_fingerprint_fn(out_sharding)(leaves))]


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(out_sharding):
  # Replicated results, so every process can read them.
  return jax.jit(lambda xs: [_array_fingerprint(x) for x in xs], out_shardings=out_sharding)


def _data_file(directory: pathlib.Path) -> pathlib.Path:
  # grain.checkpoint's per-process file name.
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class Checkpointer:
  """`DIR/<step>/{state, meta, integrity, data}`: state is the pytree, meta a JSON dict (the run's
  config and tokenizer), data the grain iterator's position for each process.

  max_to_keep: the newest steps kept. best_metric: also keep the step with the best value of this
  metric (e.g. "val_loss", passed to `save`), `best_mode` "min" or "max". clean_up_unfinished:
  remove the temporary folders of saves that never finished (only the run that writes here may:
  a reader would delete a save in progress). read_only: for inference and evaluation tools: the
  folder is neither created nor changed (a damaged step is skipped, not moved aside).
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3,
               async_save: bool = True, best_metric: str | None = None, best_mode: str = "min",
               clean_up_unfinished: bool = False, read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode={best_mode!r}: must be 'min' or 'max'")
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    self._pending = None  # the step of the save in flight, for the disk-full message
    self.best_metric = best_metric
    policy = None
    if best_metric:
      managers = ocp.checkpoint_managers
      policy = managers.AnyPreservationPolicy([
          managers.LatestN(n=max_to_keep),
          managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False)])
    self._options = (async_save, max_to_keep if policy is None else None, policy,
                     clean_up_unfinished)
    self._manager = self._open(*self._options)

  def _open(self, async_save, max_to_keep, policy, clean_up_unfinished):
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, preservation_policy=policy,
            enable_async_checkpointing=async_save and not self.read_only,
            create=not self.read_only, read_only=self.read_only,
            cleanup_tmp_directories=clean_up_unfinished and not self.read_only))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The metadata of the newest readable checkpoint, without touching its arrays."""
    for step in reversed(self.steps()):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001 - any failure here means this step is unusable
        log.error("checkpoint %s: metadata unreadable (%s); trying an older one", step, _first_line(e))
    return None

  def save(self, step: int, state, meta: dict, data_iterator: grain.DatasetIterator | None = None,
           metrics: dict | None = None):
    """Starts an (asynchronous) save of `step`; every process calls it. metrics: the step's
    logged metrics, for keeping the best checkpoint."""
    storable = _to_storable(state)
    integrity = dict(fingerprints=fingerprints(storable), process_count=jax.process_count())
    if data_iterator is not None:
      integrity["data_position"] = data_iterator.get_state()  # the same on every process
    items = dict(state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta),
                 integrity=ocp.args.JsonSave(integrity))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if self.best_metric and not (metrics and self.best_metric in metrics):
      metrics = None  # only steps that have the metric compete for "best"
    good = [s for s in self.steps() if s != step]
    try:
      self.wait()  # the previous save's failure (async) surfaces here, with its own step
      self._pending = step
      self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                         metrics={k: float(v) for k, v in metrics.items()} if metrics else None)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
      self._raise_if_disk_full(e, good)
      raise

  def restore(self, abstract_state, data_iterator: grain.DatasetIterator | None = None):
    """Newest readable checkpoint as (step, state, meta), or None when there is none.

    abstract_state: ShapeDtypeStructs, with the shardings to restore onto (any mesh: orbax
    reshards). data_iterator: set to the saved position (by the step where the checkpoint was
    written by another number of processes).
    A damaged step is logged with its error, moved aside and skipped; if steps exist but none is
    readable, that is an error rather than a silent fresh start over the user's checkpoints.
    """
    steps = self.steps()
    damaged = []
    for step in reversed(steps):
      try:
        restored = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001 - orbax, tensorstore and JSON errors alike
        log.error("checkpoint %s in %s is damaged or incomplete and was not loaded (%s: %s); "
                  "using the one before it", step, self.directory, type(e).__name__, _first_line(e))
        damaged.append(step)
        continue
      if not self.read_only:
        self._move_aside(damaged)
      return restored
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be read; "
                            f"move them away to start afresh")
    return None

  def _restore_step(self, step, abstract_state, data_iterator):
    items = dict(state=ocp.args.StandardRestore(_abstract_storable(abstract_state)),
                 meta=ocp.args.JsonRestore())
    step_dir = self.directory / str(step)
    has_integrity = (step_dir / "integrity").exists()
    if has_integrity:
      items["integrity"] = ocp.args.JsonRestore()
    same_processes = data_iterator is not None and _data_file(step_dir / "data").exists()
    if same_processes:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    storable = restored["state"]
    if has_integrity:
      expected = restored["integrity"]["fingerprints"]
      actual = fingerprints(storable)
      if len(expected) != len(actual):
        raise CheckpointError(f"{len(actual)} arrays restored, {len(expected)} saved")
      bad = [i for i, (a, b) in enumerate(zip(expected, actual)) if a != b]
      if bad:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(storable)[0]]
        raise CheckpointError(f"the arrays {', '.join(paths[i] for i in bad[:5])} do not match the "
                              f"fingerprints written with them")
    saved_position = restored["integrity"].get("data_position") if has_integrity else None
    if same_processes and saved_position is not None and (
        json.loads(json.dumps(data_iterator.get_state())) != saved_position):
      raise CheckpointError(f"the data position {data_iterator.get_state()} does not match the "
                            f"one recorded with the checkpoint ({saved_position})")
    if data_iterator is not None and not same_processes:
      # Written by another number of processes: batches are indexed by step, so the position is
      # the step (the per-process rows follow from this run's process count).
      log.warning("checkpoint %s holds no data position for process %d of %d; starting the data "
                  "at step %d", step, jax.process_index(), jax.process_count(), step)
      data_iterator.set_state({"next_index": step})
    return step, _from_storable(storable, abstract_state), restored["meta"]

  def _move_aside(self, steps):
    """Damaged steps go to `../damaged_checkpoints/` (kept for inspection): the run will write
    those step numbers again."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / "damaged_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self.directory / str(step)), str(target))
        log.error("moved damaged checkpoint %s to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("llmx: damaged checkpoints moved")
    self._manager.close()
    self._manager = self._open(*self._options)

  def _raise_if_disk_full(self, e: BaseException, good: list[int]):
    if _disk_full(e):
      last = f"step {good[-1]}" if good else "none"
      raise CheckpointError(
          f"disk full while writing checkpoint {self._pending} to {self.directory}; the last good "
          f"checkpoint is {last}. Free space, then re-run the same command to resume from it"
      ) from None

  def wait(self):
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
      self._raise_if_disk_full(e, [s for s in self.steps() if s != self._pending])
      raise

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:300]


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

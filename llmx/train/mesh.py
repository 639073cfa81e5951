"""The device mesh every experiment uses, and batch placement on it.

One mesh config for all experiments, `config.mesh` = {data, fsdp, expert, context, tensor} (one
size may be -1 for "the rest"; expert and context default to 1), over all global devices (every
process's). Batches are split along their first dimension over data x fsdp x expert (the expert
axis is data-parallel outside the MoE layers); `context` splits the sequence dimension of the
activations (context parallelism, ring attention); parameters are placed by
llmx/train/sharding.py's rules.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmx.train.config_check import ConfigError

AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch dimension is split over all three


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, *, expert: int = 1,
               context: int = 1, num_devices: int) -> tuple:
  """(data, fsdp, expert, context, tensor) with the -1 resolved; errors name the `mesh.*`
  fields."""
  sizes = [data, fsdp, expert, context, tensor]
  named = ", ".join(f"mesh.{a}={s}" for a, s in zip(AXES, sizes)
                    if a in ("data", "fsdp", "tensor") or s != 1)
  if any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"{named}: each size must be a positive integer or -1 (the rest)")
  if sizes.count(-1) > 1:
    raise ConfigError(f"{named}: at most one size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"{named}: the fixed sizes multiply to {known}, which does not divide "
                        f"the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f"{named} multiply to {int(np.prod(sizes))}, but there are {num_devices} "
                      f"devices; use -1 for one axis to take the rest")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, expert: int = 1,
              context: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp, expert, context, tensor) mesh over `devices` (default: all global devices).

  jax.make_mesh orders devices for the interconnect (TPU torus, NVLink islands); the axes are
  Auto, so jit's sharding propagation places the activations from the parameters and batches.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, expert=expert, context=context,
                     num_devices=len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def mesh_from_config(mesh_config, devices=None) -> jax.sharding.Mesh:
  """`config.mesh` (data, fsdp, tensor; expert and context when the config has them) -> the mesh."""
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices=devices,
                   expert=mesh_config.get("expert", 1), context=mesh_config.get("context", 1))


def batch_sharding(mesh) -> NamedSharding:
  """Batches are split over the data-parallel axes (data x fsdp x expert) along their first
  dimension."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_parallelism(mesh) -> int:
  """How many ways the batch dimension is split: data x fsdp x expert."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(mesh, batch_size: int, *, grad_accum_steps: int = 1,
                     field: str = "train.batch_size"):
  """Each device gets an equal share of every micro-batch."""
  ways = batch_parallelism(mesh) * grad_accum_steps
  if batch_size % ways:
    raise ConfigError(
        f"{field}={batch_size} is not divisible by mesh data x fsdp x expert "
        f"({batch_parallelism(mesh)}) x "
        f"train.grad_accum_steps ({grad_accum_steps}) = {ways}")


def data_shard(mesh, batch_size: int) -> tuple[int, int]:
  """(index, count): this process loads rows [index * b, (index + 1) * b) of every global batch,
  b = batch_size / count.

  Processes whose devices hold the same rows (a tensor axis across hosts) get the same index, so
  each loads only what its own devices need.
  """
  check_batch_size(mesh, batch_size)
  rows = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values():
    start, stop, _ = index[0].indices(batch_size)
    rows.add((start, stop))
  first, last = min(r[0] for r in rows), max(r[1] for r in rows)
  covered = sum(stop - start for start, stop in rows)
  size = last - first
  if covered != size or batch_size % size or first % size:
    raise ConfigError(f"this process's devices hold rows {sorted(rows)} of the batch, not one "
                      f"contiguous share; order the mesh's devices by process")
  return first // size, batch_size // size


def process_rows(batch, mesh):
  """This process's rows of a global batch that every process holds in full (a pytree)."""
  leaves = jax.tree.leaves(batch)
  index, count = data_shard(mesh, leaves[0].shape[0])
  rows = leaves[0].shape[0] // count
  return jax.tree.map(lambda x: x[index * rows:(index + 1) * rows], batch)


def global_batch(local_batch, sharding: NamedSharding):
  """Assembles the global batch (a pytree of arrays) from each process's rows."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def on_every_host(model, mesh):
  """The model with whole parameters in this host's memory, so one process can sample alone.
  With several processes this gathers the shards: every process must call it."""
  from flax import nnx
  if jax.process_count() == 1:
    return model
  params = nnx.state(model, nnx.Param)
  gathered = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  nnx.update(model, jax.tree.map(np.asarray, gathered))
  return model

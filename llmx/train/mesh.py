"""Device meshes and batch placement."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all global devices; one size may be -1 for "the rest"."""
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: at most one may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: each must be positive or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} multiply to {int(np.prod(sizes))}, "
                     f"but there are {len(devices)} devices")
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh) -> NamedSharding:
  """Batches are split over the data-parallel axes (data x fsdp) along their first dimension."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles the global batch from each process's rows."""
  return jax.make_array_from_process_local_data(sharding, local_batch)

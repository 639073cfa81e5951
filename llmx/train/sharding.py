"""Where each array of the train state lives on the mesh: logical axis names -> mesh axes.

Layers name their parameters' dimensions by what they are (`embed`, `mlp`, `heads`, `vocab`; see
llmx/nn/axes.py) in NNX sharding metadata. One table per strategy maps those names to mesh axes:

  strategy       embed   mlp      heads    vocab    what each device holds
  data_parallel  -       -        -        -        everything (replicated)
  fsdp           fsdp    fsdp     fsdp     fsdp     1/fsdp of every array (ZeRO-3 style)
  fsdp_tensor    fsdp    tensor   tensor   tensor   1/(fsdp x tensor) of the big matrices

and in every strategy `expert` (an MoE layer's expert dimension) -> the `expert` mesh axis
(expert parallelism; an expert axis of size 1 splits nothing).

A mesh axis splits at most one dimension of an array, the first one it divides (under FSDP a
[embed, mlp] kernel is split along embed, its [mlp] bias along mlp). The strategy follows from the
mesh (`strategy_for`): an axis of size 1 splits nothing, so one config (`mesh.fsdp`,
`mesh.tensor`) picks it. The optimizer state carries the parameters' names (optax maps over the
NNX State), so it is sharded like them. A dimension that no mesh axis divides stays whole; a
parameter without names is replicated, except that under FSDP its largest divisible dimension is
split, so model families without names still get FSDP.
"""
import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger("llmx")

RULES = {
    "data_parallel": {"expert": "expert"},
    "fsdp": {"embed": "fsdp", "mlp": "fsdp", "heads": "fsdp", "vocab": "fsdp", "expert": "expert"},
    "fsdp_tensor": {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor",
                    "expert": "expert"},
}


def strategy_for(mesh) -> str:
  if mesh.shape.get("tensor", 1) > 1:
    return "fsdp_tensor"
  if mesh.shape.get("fsdp", 1) > 1:
    return "fsdp"
  return "data_parallel"


def logical_axes(variable) -> tuple | None:
  """The logical axis names an NNX Variable carries (`nnx.with_partitioning`), or None."""
  metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  # `out_sharding` in Flax >= 0.12; older releases called it `sharding_names` / `sharding`.
  for key in ("out_sharding", "sharding_names", "sharding"):
    axes = metadata.get(key)
    if axes:
      return tuple(axes)
  return None


def partition_spec(shape, axes, rules: dict, mesh) -> P:
  """Logical axes of an array of `shape` -> PartitionSpec; a dimension the mesh axis does not
  divide, or a mesh axis already used by another dimension, stays unsplit."""
  spec, used = [], set()
  for dim, name in zip(shape, axes):
    mesh_axis = rules.get(name) if name is not None else None
    if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1 \
        or dim % mesh.shape[mesh_axis]:
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def _largest_divisible(shape, mesh, mesh_axis: str) -> P:
  size = mesh.shape[mesh_axis]
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
  if size == 1 or not candidates or len(shape) < 2:
    return P()
  dim = max(candidates, key=lambda d: shape[d])
  return P(*[mesh_axis if d == dim else None for d in range(len(shape))])


def state_shardings(abstract_state, mesh, rules: dict | None = None):
  """NamedShardings for every array of a state pytree (as from `jax.eval_shape(init)`), in its
  structure. rules: logical axis -> mesh axis; default `RULES[strategy_for(mesh)]`."""
  if rules is None:
    rules = RULES[strategy_for(mesh)]
  is_var = lambda x: isinstance(x, nnx.Variable)
  nodes, _ = jax.tree.flatten(abstract_state, is_leaf=is_var)
  specs, unnamed = [], 0
  for node in nodes:
    leaves = jax.tree.leaves(node)
    axes = logical_axes(node) if is_var(node) else None
    for leaf in leaves:
      shape = getattr(leaf, "shape", ())
      if axes is not None and len(axes) == len(shape):
        specs.append(partition_spec(shape, axes, rules, mesh))
      elif is_var(node) and isinstance(node, nnx.Param) and "fsdp" in rules.values():
        unnamed += 1
        specs.append(_largest_divisible(shape, mesh, "fsdp"))
      else:
        specs.append(P())
  if unnamed:
    log.info("%d parameter arrays (and their optimizer moments) carry no logical axis names: FSDP "
             "splits their largest divisible dimension", unnamed)
  treedef = jax.tree.structure(abstract_state)
  if treedef.num_leaves != len(specs):
    raise AssertionError(f"{treedef.num_leaves} arrays but {len(specs)} shardings")
  return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def with_shardings(abstract_state, shardings):
  """The abstract state with each ShapeDtypeStruct carrying its sharding (for restoring)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def bytes_per_device(tree) -> dict:
  """{device: bytes of `tree`'s shards that live on it}, from each array's addressable shards
  (this process's devices)."""
  out = {}
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def total_bytes(tree) -> int:
  """Bytes of `tree` counted once (its logical size, whatever the sharding)."""
  def nbytes(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.eval_shape(jax.random.key_data, x)
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return sum(nbytes(x) for x in jax.tree.leaves(tree))


def describe(state, mesh) -> str:
  per_device = bytes_per_device(state)
  total = total_bytes(state)
  largest = max(per_device.values()) if per_device else 0
  return (f"mesh {dict(mesh.shape)} ({strategy_for(mesh)}): state {total / 2**20:.2f} MiB, "
          f"at most {largest / 2**20:.2f} MiB on one device ({largest / max(total, 1):.1%})")

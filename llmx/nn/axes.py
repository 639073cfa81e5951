"""Logical axis names for parameter dimensions, carried as NNX sharding metadata.

A layer names each dimension of its parameters by what it is, never by a device axis; the
trainer's rules table (llmx/train/sharding.py) maps the names to mesh axes, so one model runs
data parallel, FSDP or tensor parallel by changing only the mesh.
"""
from flax import nnx

EMBED = "embed"  # the model width, d_model
MLP = "mlp"      # the MLP's hidden width
HEADS = "heads"  # attention projections' heads x head_dim
VOCAB = "vocab"  # the vocabulary
EXPERT = "expert"  # the experts of a mixture-of-experts layer


def with_axes(init, *axes: str | None):
  """`init`, with the parameter it creates named by `axes` (one per dimension, None for none), as
  `nnx.with_partitioning` names it.

  eager_sharding=False: by default NNX places a named parameter on the mesh as it is created,
  which fails outside a mesh and would read these logical names as mesh axes; the trainer instead
  resolves the names and creates the whole state sharded with `jax.jit(init, out_shardings=...)`.
  """
  # nnx.with_partitioning's metadata, less its `mesh=None` entry (every jit call flattens it).
  return nnx.with_metadata(init, out_sharding=tuple(axes), eager_sharding=False)


def param(value, *axes: str | None) -> nnx.Param:
  """An nnx.Param named by `axes` (see with_axes)."""
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)

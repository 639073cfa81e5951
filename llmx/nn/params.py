"""Parameter counts of a model (also of an abstract one from `nnx.eval_shape`)."""
import math

import jax
from flax import nnx


def num_params(model: nnx.Module, *, skip: tuple[str, ...] = ()) -> int:
  """The number of parameters, leaving out those under an attribute named in `skip` (nanoGPT
  reports its count without the position table: `skip=("wpe",)`)."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  key = lambda k: getattr(k, "key", getattr(k, "name", None))
  return sum(math.prod(leaf.shape) for path, leaf in leaves
             if not any(key(k) in skip for k in path))

"""Activation rematerialisation: recompute a layer's activations in the backward pass instead of
keeping them, trading compute for memory (`model.remat`)."""
import jax
from flax import nnx

POLICIES = {
    "none": None,  # keep every activation (fastest; most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    # keep the dense layers' outputs, recompute the elementwise ops and attention
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn, policy: str):
  """fn(module, *arrays) rematerialised under `policy` (a name in POLICIES); `fn` itself for
  "none". Python values (sizes, flags) must be bound in `fn`, not passed as arguments."""
  if policy not in POLICIES:
    raise ValueError(f"remat={policy!r}: must be one of {', '.join(map(repr, POLICIES))}")
  if POLICIES[policy] is None:
    return fn
  return nnx.remat(fn, policy=POLICIES[policy])

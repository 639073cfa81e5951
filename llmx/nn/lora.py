"""LoRA (Hu et al. 2021): low-rank adapters beside frozen linear layers.

`y = base(x) + (dropout(x) @ A @ B) * alpha / rank` on chosen column ranges of the output: a
fused projection (q|k|v in one matrix, gate|up in another) gets one adapter per part it targets,
so "q,v" adapts the query and value columns and leaves the key columns alone. B starts at zero,
so an adapted model starts out computing exactly what the base model does.

Adapters are `nnx.LoRAParam`s, so a step that differentiates only that type (`supervised(...,
wrt=nnx.LoRAParam)`) trains and optimises the adapters alone; `merge` folds them into the base
kernels for export.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from llmx.nn.dropout import Dropout


class LoRALinear(nnx.Module):
  """A frozen `nnx.Linear` plus adapters on the output columns [start, end) of each segment.

  x: [..., in_features] -> [..., out_features].
  """

  def __init__(self, base: nnx.Linear, segments: tuple[tuple[int, int], ...], *, rank: int,
               alpha: float, dropout: float = 0.0, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"rank={rank}: must be >= 1")
    self.base = base
    self.segments = tuple(segments)
    self.scale = alpha / rank
    # A as in the paper's reference code (Kaiming-uniform), B zero.
    init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    dtype = jnp.float32  # adapters train in float32 even over a bfloat16 base
    self.lora_a = nnx.List([nnx.LoRAParam(init_a(rngs.params(), (base.in_features, rank), dtype))
                            for _ in self.segments])
    self.lora_b = nnx.List([nnx.LoRAParam(jnp.zeros((rank, end - start), dtype))
                            for start, end in self.segments])
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x, deterministic=None):
    y = self.base(x)
    h = self.dropout(x, deterministic=deterministic)
    for (start, end), a, b in zip(self.segments, self.lora_a, self.lora_b):
      delta = (h @ a[...].astype(h.dtype)) @ b[...].astype(h.dtype)
      y = y.at[..., start:end].add((delta * self.scale).astype(y.dtype))
    return y

  def merged_kernel(self) -> jax.Array:
    """The base kernel with the adapters folded in: [in_features, out_features]."""
    kernel = self.base.kernel[...]
    for (start, end), a, b in zip(self.segments, self.lora_a, self.lora_b):
      delta = (a[...].astype(jnp.float32) @ b[...].astype(jnp.float32)) * self.scale
      kernel = kernel.at[:, start:end].add(delta.astype(kernel.dtype))
    return kernel


def adapt(parent: nnx.Module, name: str, segments, *, rank: int, alpha: float, dropout: float,
          rngs: nnx.Rngs) -> LoRALinear:
  """Replaces the Linear `parent.<name>` by a LoRALinear over it (in place); -> the new layer."""
  base = getattr(parent, name)
  if not isinstance(base, nnx.Linear):
    raise TypeError(f"{type(parent).__name__}.{name} is a {type(base).__name__}, not nnx.Linear")
  layer = LoRALinear(base, segments, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
  setattr(parent, name, layer)
  return layer


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and puts the plain Linear back (in place); -> the
  model, computing what the adapted model computed."""
  for path, module in list(nnx.iter_graph(model)):
    if not isinstance(module, nnx.Module):
      continue
    for name, child in list(vars(module).items()):
      if isinstance(child, LoRALinear):
        child.base.kernel.value = child.merged_kernel()
        setattr(module, name, child.base)
  return model


def num_adapter_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))

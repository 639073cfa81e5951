"""Name maps: which model variable each checkpoint tensor fills, and how.

A family's importer is a table of Entries plus a few transforms; for layer i of a Llama:

  Entry(f"model.layers.{i}.self_attn.o_proj.weight", ("layers", i, "attn", "out", "kernel"), TRANSPOSE)
  Entry([f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"],
        ("layers", i, "attn", "qkv", "kernel"), concat((q_size, kv_size, kv_size), transpose=True))

`load` checks the whole table against the checkpoint's headers (missing, unexpected, mis-shaped
and non-float tensors, all in one error) before it reads any data, then fills the variables one
at a time; `export` turns the model back into {name: array} with the same table.
"""
import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmx.formats import CheckpointFormatError
from llmx.formats import safetensors


class Transform(NamedTuple):
  """How a variable is stored. Both functions use array methods or jnp only, so that
  jax.eval_shape can tell the checkpoint shapes a variable expects without any data."""
  to_model: Callable    # (*checkpoint tensors, in Entry.hf order) -> the variable's value
  to_hf: Callable       # the variable's value -> tuple of checkpoint tensors, in Entry.hf order


SAME = Transform(lambda x: x, lambda x: (x,))
# torch.nn.Linear stores weights [out, in]; an nnx.Linear kernel is [in, out].
TRANSPOSE = Transform(lambda x: x.T, lambda x: (x.T,))


def concat(sizes: int | Sequence[int], *, transpose: bool = False) -> Transform:
  """Several checkpoint tensors joined along the variable's last axis into one (fused
  projections: query, key and value into one qkv kernel [in, q + k + v]).
  sizes: each part's size along that axis, in Entry.hf order, or the number of equal parts.
  transpose: each part is stored [out, in] (torch.nn.Linear) and the variable is [in, out]."""
  flip = (lambda x: x.T) if transpose else (lambda x: x)
  # jnp.split takes the offsets where parts start, not their sizes.
  cuts = sizes if isinstance(sizes, int) else list(np.cumsum(sizes)[:-1])
  return Transform(lambda *parts: jnp.concatenate([flip(p) for p in parts], axis=-1),
                   lambda x: tuple(flip(p) for p in jnp.split(x, cuts, axis=-1)))


def reshape(hf_shape: Sequence[int], model_shape: Sequence[int], *,
            transpose: bool = False) -> Transform:
  """A variable stored with another shape of the same size, e.g. an attention output kernel
  [n_head, head_dim, d_model] stored as a torch Linear weight [d_model, n_head * head_dim]:
  reshape((d_model, n_head * head_dim), (n_head, head_dim, d_model), transpose=True).
  transpose: the stored tensor is transposed before it is reshaped."""
  flip = (lambda x: x.T) if transpose else (lambda x: x)
  flipped = tuple(hf_shape)[::-1] if transpose else tuple(hf_shape)
  return Transform(lambda x: flip(x).reshape(tuple(model_shape)),
                   lambda x: (flip(x.reshape(flipped)),))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One model variable and the checkpoint tensor(s) it is stored as.
  hf: the tensor's name, or the names of the tensors `transform` joins into the variable.
  path: the variable's attribute path in the model; ints index lists, e.g.
    ("blocks", 3, "attn", "qkv", "kernel")."""
  hf: str | tuple[str, ...]
  path: tuple
  transform: Transform = SAME

  def __post_init__(self):
    object.__setattr__(self, "hf", (self.hf,) if isinstance(self.hf, str) else tuple(self.hf))
    object.__setattr__(self, "path", tuple(self.path))


def variable_at(model, path: Sequence):
  """The model's variable (nnx.Variable) at `path`, or None where the model has none (bias=False)."""
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def expected_shapes(model, entry: Entry) -> list[tuple[int, ...]]:
  """The checkpoint shapes of entry.hf that the model's variable takes, from shapes alone."""
  variable = variable_at(model, entry.path)
  if variable is None:
    raise ValueError(f"the model has no variable at {'.'.join(map(str, entry.path))} (for {entry.hf})")
  parts = jax.eval_shape(entry.transform.to_hf, jax.ShapeDtypeStruct(variable.shape, variable.dtype))
  return [tuple(p.shape) for p in parts]


def _listing(kind: str, items: list[str], limit: int = 20) -> str:
  more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
  return f"{kind} ({len(items)}): {', '.join(items[:limit])}{more}"


def check(model, entries: Sequence[Entry], infos: dict[str, safetensors.TensorInfo]) -> list[str]:
  """What keeps `infos` (checkpoint name -> header, e.g. from formats.hf.read_headers) from
  filling `model` through `entries`: one line per kind of problem; empty when it fits."""
  used = [name for e in entries for name in e.hf]
  if len(set(used)) != len(used):
    raise ValueError(f"name map lists a tensor twice: {sorted({n for n in used if used.count(n) > 1})}")
  missing = [name for name in used if name not in infos]
  unexpected = sorted(set(infos) - set(used))
  not_float = [f"{n} in {infos[n].file.name}: {infos[n].dtype}" for n in used
               if n in infos and not infos[n].is_float]
  misshaped = []
  for e in entries:
    if all(n in infos for n in e.hf):
      for name, want in zip(e.hf, expected_shapes(model, e)):
        if infos[name].shape != want:
          misshaped.append(f"{name} in {infos[name].file.name}: {infos[name].shape}, expected {want}")
  return [_listing(kind, items) for kind, items in (
      ("missing weights", missing), ("unexpected weights", unexpected),
      ("mis-shaped weights", misshaped), ("not floating-point weights", not_float)) if items]


def load(model, entries: Sequence[Entry], infos: dict[str, safetensors.TensorInfo], *, source) -> None:
  """Fills the model's variables from the checkpoint tensors `infos` (name -> header; a family
  renames and drops names, e.g. buffers, before). Everything is checked first, so a bad
  checkpoint changes nothing and one error (naming `source`) lists every problem."""
  problems = check(model, entries, infos)
  if problems:
    raise CheckpointFormatError(f"{source} does not match its config.json: {'. '.join(problems)}")
  # Memory-mapped: each tensor is read when its entry is filled, not all at once.
  arrays = safetensors.read_tensors(infos[n] for e in entries for n in e.hf)
  for e in entries:
    variable = variable_at(model, e.path)
    tensors = [arrays[infos[n].name] for n in e.hf]
    for name, tensor in zip(e.hf, tensors):
      check_finite(tensor, name, infos[name].file)
    value = e.transform.to_model(*tensors)
    if value.shape != variable.shape:  # a wrong table, not a wrong checkpoint: shapes were checked
      raise ValueError(f"name map for {e.hf} gives {value.shape}, the variable is {variable.shape}")
    variable[...] = jnp.asarray(value, variable.dtype)


def check_finite(tensor: np.ndarray, name: str, file) -> None:
  """A weight holding NaN or Inf is refused, naming the tensor and its file (it would make every
  output NaN, far from the cause)."""
  if not np.isfinite(np.asarray(tensor, np.float32)).all():
    raise CheckpointFormatError(f"{file}: tensor {name!r} holds NaN or Inf values")


def build_and_load(build: Callable, entries_of: Callable, infos: dict, *, source):
  """`build()` filled from the checkpoint: the name map is checked against the headers on the
  abstract model first (`nnx.eval_shape`, no memory), so a config.json whose sizes do not match
  the tensors is refused before any parameter is allocated. entries_of(model) -> the Entries."""
  from flax import nnx
  abstract = nnx.eval_shape(build)
  problems = check(abstract, entries_of(abstract), infos)
  if problems:
    raise CheckpointFormatError(f"{source} does not match its config.json: {'. '.join(problems)}")
  model = build()
  load(model, entries_of(model), infos, source=source)
  return model


def export(model, entries: Sequence[Entry], *, dtype=None) -> dict[str, np.ndarray]:
  """The model's variables as checkpoint tensors {name: array}. dtype: of every tensor (None:
  each variable's own)."""
  out = {}
  for e in entries:
    variable = variable_at(model, e.path)
    if variable is None:
      raise ValueError(f"the model has no variable at {'.'.join(map(str, e.path))} (for {e.hf})")
    for name, part in zip(e.hf, e.transform.to_hf(np.asarray(variable[...])), strict=True):
      out[name] = np.ascontiguousarray(np.asarray(part, dtype))
  return out

"""Context parallelism: the sequence dimension of the activations split over a mesh axis.

A batch of rows [B, S] goes into the *context layout* before the model sees it: every row is cut
into 2C chunks (C = the context axis size), shard c gets chunks c and 2C-1-c (zig-zag: under a
causal mask every shard then has the same visible work), and each row's pieces become
consecutive rows: [B, S] -> [B * C, S / C], row b * C + c = shard c's piece of row b. Tokens,
targets, positions (the true ones: RoPE and the learned table need them) and segment ids all
move the same way. Sharding that first dimension over (*batch axes, context), the mesh's order,
is a plain 1-D sharding of the flattened tokens (the one expert-parallel MoE layers use too, so
no tokens move between them), reached from the batch's row sharding without communication; so
every per-token
op (embeddings, norms, MLP, the loss: a mean, which the reordering does not change) runs as in
data parallelism; only attention needs the whole row, and `attention` runs it inside
`jax.shard_map` over the context axis (llmx/nn/ring_attention.py).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from llmx.nn import ring_attention as ring

# The values of `model.context_attention`: keys and values around a ring (O(local) memory), or
# all gathered to every shard (O(global) keys, one collective).
CONTEXT_ATTENTIONS = ("ring", "all_gather")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Where the context layout lives: the mesh, its context axis, the axes that split the batch
  (the rows of every shard), the axis that splits attention heads (tensor parallelism) or None,
  and how attention crosses shards ("ring" or "all_gather")."""
  mesh: Any
  axis: str = "context"
  batch_axes: tuple = ()
  head_axis: str | None = None
  attention: str = "ring"
  attention_impl: str | None = None  # the kernel's implementation, for "all_gather"
  query_block: int = ring.QUERY_BLOCK  # "ring": queries per inner block of a ring step

  def __post_init__(self):
    if self.attention not in CONTEXT_ATTENTIONS:
      raise ValueError(f"attention={self.attention!r}: must be one of {CONTEXT_ATTENTIONS}")

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]

  def rows_spec(self, *rest) -> P:
    """The PartitionSpec of an array whose first dimension is context-layout rows."""
    return P((*self.batch_axes, self.axis), *rest)


def to_layout(x, size: int):
  """[B, S, ...] -> [B * size, S / size, ...] in the zig-zag context layout (2 * size | S)."""
  b, s = x.shape[:2]
  if s % (2 * size):
    raise ValueError(f"sequence length {s} is not divisible by 2 x context size ({2 * size})")
  chunks = x.reshape(b, 2, size, s // (2 * size), *x.shape[2:])
  # shard c: chunk c of the first half, then chunk size-1-c of the second half (= 2C-1-c).
  pair = jnp.stack([chunks[:, 0], chunks[:, 1, ::-1]], axis=2)  # [B, C, 2, L, ...]
  return pair.reshape(b * size, s // size, *x.shape[2:])


def from_layout(x, size: int):
  """The inverse of to_layout: [B * size, S / size, ...] -> [B, S, ...]."""
  rows, local = x.shape[:2]
  b = rows // size
  pair = x.reshape(b, size, 2, local // 2, *x.shape[2:])  # [B, C, 2, L, ...]
  chunks = jnp.stack([pair[:, :, 0], pair[:, ::-1, 1]], axis=1)  # [B, 2, C, L, ...]
  return chunks.reshape(b, size * local, *x.shape[2:])


def shard_rows(x, cp: ContextParallel):
  """x with its first dimension (context-layout rows) split over (context, *batch axes)."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(cp.mesh, cp.rows_spec()))


def layout_batch(cp: ContextParallel, inputs, targets, positions=None, segment_ids=None):
  """int [B, S] arrays -> the same in the context layout, sharded over the mesh. positions None:
  0 .. S-1 in every row (they are needed now: the rows no longer start at 0)."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  out = [None if x is None else shard_rows(to_layout(x, cp.size), cp)
         for x in (inputs, targets, positions, segment_ids)]
  return tuple(out)


def attention(q, k, v, segment_ids, cp: ContextParallel, *, is_causal: bool = True,
              logits_soft_cap: float | None = None):
  """Attention of context-layout rows over whole sequences.

  q: [B * C, T, N, D], k and v: [B * C, T, K, D] (T = S / C); segment_ids: int [B * C, T] or
  None. -> [B * C, T, N, D].
  """
  rows, t = q.shape[:2]
  c = cp.size
  split = lambda x: None if x is None else x.reshape(rows // c, c, *x.shape[1:])
  heads = cp.head_axis
  if heads is not None and k.shape[2] % cp.mesh.shape[heads]:
    heads = None  # keys' heads do not split evenly: keep them whole
  spec = P(cp.batch_axes or None, cp.axis, None, heads, None)
  seg_spec = P(cp.batch_axes or None, cp.axis, None)
  shard_fn = ring.ring_attention if cp.attention == "ring" else ring.all_gather_attention
  kwargs = dict(axis_name=cp.axis, num_shards=c, is_causal=is_causal,
                logits_soft_cap=logits_soft_cap, query_block=cp.query_block)
  if cp.attention == "all_gather":
    kwargs["implementation"] = cp.attention_impl

  def local(q, k, v, seg):  # [B / batch shards, 1, T, ...]: this shard's pieces of its rows
    seg = None if seg is None else seg[:, 0]
    return shard_fn(q[:, 0], k[:, 0], v[:, 0], seg, **kwargs)[:, None]

  out = jax.shard_map(local, mesh=cp.mesh, in_specs=(spec, spec, spec, seg_spec),
                      out_specs=spec, check_vma=False)(
                          split(q), split(k), split(v), split(segment_ids))
  return out.reshape(q.shape)

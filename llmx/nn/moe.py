"""Mixture of experts: a routed feed-forward layer of SwiGLU experts (Shazeer 2017; GShard;
Switch; Mixtral; DeepSeek-V3).

A float32 linear router scores every token against `num_experts` experts; each token goes to its
`top_k` best and the output is the gate-weighted sum of their SwiGLU outputs (plus an optional
shared expert that every token passes through). Two ways to run the experts:

  dropless (capacity_factor=0): the (token, choice) pairs are sorted by expert and one grouped
    matmul (`jax.lax.ragged_dot`, group sizes = tokens per expert) runs every expert on exactly
    its tokens; nothing is dropped whatever the imbalance. On CPU, where XLA lowers ragged_dot
    to a masked dense matmul against every expert, "tiled" pads each expert's rows to 128-row
    tiles and runs a batched matmul over the tiles instead (the same result).
  capacity (capacity_factor > 0): each expert takes at most
    capacity = ceil(capacity_factor * tokens * top_k / num_experts) pairs into a fixed
    [num_experts, capacity, d_model] buffer (a batched matmul: static shapes, GShard / Switch);
    the pairs beyond it are dropped (they contribute zero). Priority is choice-major: every
    token's first choice is placed before any token's second choice, then by token order.

Expert parallelism: given a mesh with an `expert` axis of size n > 1, the expert weights are
split over it (logical axis "expert", llmx/train/sharding.py) and, inside `jax.shard_map`, each
device routes its own tokens, sends every pair to the device holding its expert with
`lax.all_to_all`, runs its num_experts / n experts and sends the results back. Capacity then
holds per device group (its tokens), as in GShard; the same per-device routing (without the
exchange) runs on any mesh of several devices, expert = 1 included. The dropless exchange sends
fixed buffers sized for the worst case (all of a device's pairs to one device): n x the pairs'
memory on the receiving side; `ragged_all_to_all` would send only the real rows (a follow-up).

Auxiliary values (float32 scalars unless noted), all over the layer's tokens:
  aux_loss: load balancing, num_experts * sum_e f_e * p_e, f_e = fraction of the (token, choice)
    pairs routed to e (before drops), p_e = mean router probability of e; 1.0 when balanced.
  z_loss: mean over tokens of logsumexp(router logits)^2 (ST-MoE), keeps the logits small.
  load: [num_experts] f_e (sums to 1).
  dropped: fraction of the pairs dropped by the capacity (0 when dropless).
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmx.nn.axes import EMBED, EXPERT, MLP, param
from llmx.nn.dropout import Dropout
from llmx.nn.mlp import SwiGLU

GATINGS = ("softmax", "sigmoid")
EXPERT_AXIS = "expert"  # the mesh axis the experts are split over
_TENSOR_AXIS = "tensor"  # tokens are replicated over it (every other mesh axis splits them)


def route(logits, top_k: int, gating: str):
  """Router logits float32 [T, E] -> (experts int32 [T, k], gates float32 [T, k], probs [T, E]).

  softmax: probabilities softmax(logits); the top k renormalised to sum to 1 (Mixtral), except for
    top_k = 1, which keeps the raw probability (Switch) so the router still learns from the loss.
  sigmoid: scores sigmoid(logits) (DeepSeek-V3); the top k normalised to sum to 1; `probs` (for
    the balance loss) are the scores normalised over all experts.
  """
  if gating == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    top, experts = jax.lax.top_k(probs, top_k)
    gates = top if top_k == 1 else top / top.sum(-1, keepdims=True)
  elif gating == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    top, experts = jax.lax.top_k(scores, top_k)
    gates = top / top.sum(-1, keepdims=True)
    probs = scores / scores.sum(-1, keepdims=True)
  else:
    raise ValueError(f"gating={gating!r}: must be one of {', '.join(map(repr, GATINGS))}")
  return experts.astype(jnp.int32), gates, probs


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Pairs one expert takes from a group of `tokens` tokens (capacity mode)."""
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def _pairs(experts):
  """experts int [T, k] -> (expert of each pair, token of each pair), int [k * T] in choice-major
  order (the capacity priority)."""
  t, k = experts.shape
  return experts.T.reshape(-1), jnp.tile(jnp.arange(t, dtype=jnp.int32), k)


def _positions(groups, num_groups: int):
  """groups int [N] -> (order: a stable sort by group, int [N]; counts [num_groups]; each pair's
  position within its group, in the original order, int [N])."""
  n = groups.shape[0]
  order = jnp.argsort(groups, stable=True)
  counts = jnp.zeros(num_groups, jnp.int32).at[groups].add(1, mode="drop")
  starts = jnp.cumsum(counts) - counts
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return order, counts, rank - starts[jnp.minimum(groups, num_groups - 1)]


GROUPED = ("ragged_dot", "tiled")  # grouped-matmul implementations ("auto": by backend)
TILE = 128  # rows per tile of the "tiled" grouped matmul


def grouped_impl(name: str) -> str:
  """`auto` -> "tiled" on CPU, whose ragged_dot is a dense matmul against every expert masked
  (num_experts x the FLOPs), else "ragged_dot" (a real grouped-matmul kernel on GPU and TPU)."""
  if name == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if name not in GROUPED:
    raise ValueError(f"grouped={name!r}: must be 'auto' or one of {', '.join(map(repr, GROUPED))}")
  return name


def _swiglu_tiled(xs, counts, w_gate_up, w_down, tile: int = TILE):
  """_swiglu_grouped as a batched matmul over row tiles (megablox's layout in plain XLA): each
  group is padded to whole tiles of `tile` rows, each tile runs against its expert's weights
  (gathered per tile). At most M + E * (tile - 1) rows are computed instead of E * M."""
  (m, d), num_experts = xs.shape, counts.shape[0]
  tile = min(tile, max(8, m))
  n_tiles = (m + num_experts * (tile - 1)) // tile
  padded = (counts + tile - 1) // tile * tile
  ends, padded_ends = jnp.cumsum(counts), jnp.cumsum(padded)
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.searchsorted(ends, rows, side="right")  # E for the rows beyond the groups
  g = jnp.minimum(group, num_experts - 1)
  dest = jnp.where(group < num_experts, padded_ends[g] - padded[g] + rows - (ends[g] - counts[g]),
                   n_tiles * tile)
  buf = jnp.zeros((n_tiles * tile, d), xs.dtype).at[dest].set(xs, mode="drop")
  tile_expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(n_tiles) * tile,
                                             side="right"), num_experts - 1)
  yb = _swiglu_batched(buf.reshape(n_tiles, tile, d), w_gate_up[tile_expert], w_down[tile_expert])
  return yb.reshape(n_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


def _swiglu_grouped(xs, counts, w_gate_up, w_down, grouped: str = "ragged_dot"):
  """Rows xs [M, d] sorted by expert, counts int [E] (rows beyond their sum give zeros),
  w_gate_up [E, d, 2h], w_down [E, h, d] -> [M, d]."""
  if grouped == "tiled":
    return _swiglu_tiled(xs, counts, w_gate_up, w_down)
  h = jax.lax.ragged_dot(xs, w_gate_up.astype(xs.dtype), counts)
  hidden = w_down.shape[1]
  return jax.lax.ragged_dot(jax.nn.silu(h[:, :hidden]) * h[:, hidden:], w_down.astype(xs.dtype),
                            counts)


def _swiglu_batched(xb, w_gate_up, w_down):
  """xb [E, C, d] (row block e for expert e) -> [E, C, d]."""
  h = jnp.einsum("ecd,edf->ecf", xb, w_gate_up.astype(xb.dtype))
  hidden = w_down.shape[1]
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(h[..., :hidden]) * h[..., hidden:],
                    w_down.astype(xb.dtype))


def _combine(out, gates, keep):
  """Per-pair outputs [k * T, d] (choice-major), gates [T, k], keep bool [T, k] -> [T, d]."""
  t, k = gates.shape
  w = (gates * keep).astype(out.dtype)
  return jnp.einsum("kt,ktd->td", w.T, out.reshape(k, t, -1))


def experts_local(x, experts, gates, w_gate_up, w_down, capacity_factor: float,
                  grouped: str = "ragged_dot"):
  """All experts on one device. x [T, d], experts int [T, k], gates [T, k], w_gate_up
  [E, d, 2h], w_down [E, h, d] -> (y [T, d], keep bool [T, k]: the pairs not dropped)."""
  num_experts, (t, k) = w_gate_up.shape[0], experts.shape
  ids, tokens = _pairs(experts)
  order, counts, pos = _positions(ids, num_experts)
  if not capacity_factor:
    ys = _swiglu_grouped(x[tokens[order]], counts, w_gate_up, w_down, grouped)
    out = jnp.zeros_like(ys).at[order].set(ys)  # back to pair order (the gather's transpose)
    keep = jnp.ones((t, k), bool)
  else:
    cap = capacity(t, k, num_experts, capacity_factor)
    kept = pos < cap
    slot = jnp.where(kept, ids * cap + pos, num_experts * cap)  # out of range: dropped
    buf = jnp.zeros((num_experts * cap, x.shape[-1]), x.dtype).at[slot].set(x[tokens], mode="drop")
    yb = _swiglu_batched(buf.reshape(num_experts, cap, -1), w_gate_up, w_down)
    out = yb.reshape(num_experts * cap, -1).at[slot].get(mode="fill", fill_value=0)
    keep = kept.reshape(k, t).T
  return _combine(out, gates, keep), keep


def experts_sharded(x, experts, gates, w_gate_up, w_down, capacity_factor: float,
                    grouped: str = "ragged_dot"):
  """The body of the expert-parallel shard_map: this device's tokens x [T, d], experts [T, k],
  gates [T, k] and its E / n experts' weights [E / n, d, 2h], [E / n, h, d] -> (y [T, d],
  keep [T, k]). Pairs travel to the device of their expert and back with two all_to_alls."""
  n = jax.lax.axis_size(EXPERT_AXIS)
  local_experts = w_gate_up.shape[0]
  num_experts, (t, k), d = local_experts * n, experts.shape, x.shape[-1]
  ids, tokens = _pairs(experts)
  device, local = ids // local_experts, ids % local_experts
  if not capacity_factor:  # each device may send all of its pairs to one device
    rows = t * k
    _, _, slot = _positions(device, n)
    kept = jnp.ones_like(ids, bool)
  else:  # [local expert, capacity] blocks per destination device
    cap = capacity(t, k, num_experts, capacity_factor)
    rows = local_experts * cap
    _, _, pos = _positions(ids, num_experts)
    kept = pos < cap
    slot = local * cap + pos
  flat = jnp.where(kept, device * rows + slot, n * rows)  # out of range: dropped
  send = jnp.zeros((n * rows, d), x.dtype).at[flat].set(x[tokens], mode="drop")
  send_ids = jnp.full((n * rows,), local_experts, jnp.int32).at[flat].set(local, mode="drop")
  # Block s of what a device receives comes from device s.
  recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
  recv_ids = jax.lax.all_to_all(send_ids, EXPERT_AXIS, 0, 0, tiled=True)
  if not capacity_factor:
    # Empty rows carry id local_experts: sorted last, beyond the group sizes, so they give zeros.
    order, counts, _ = _positions(recv_ids, local_experts + 1)
    ys = _swiglu_grouped(recv[order], counts[:local_experts], w_gate_up, w_down, grouped)
    done = jnp.zeros_like(ys).at[order].set(ys)
  else:  # [source, local expert, cap] -> [local expert, source x cap]: empty rows stay zero
    xb = recv.reshape(n, local_experts, cap, d).swapaxes(0, 1).reshape(local_experts, n * cap, d)
    yb = _swiglu_batched(xb, w_gate_up, w_down)
    done = yb.reshape(local_experts, n, cap, d).swapaxes(0, 1).reshape(n * rows, d)
  back = jax.lax.all_to_all(done, EXPERT_AXIS, 0, 0, tiled=True)
  out = back.at[flat].get(mode="fill", fill_value=0)
  keep = kept.reshape(k, t).T
  return _combine(out, gates, keep), keep


def _sharded_mesh(mesh):
  """The mesh to route on per device (more than one device, with an `expert` axis), else None:
  the given mesh, or the one jax.sharding.use_mesh / jax.set_mesh made current.

  Also with expert = 1: under plain data parallelism the one-device path's sort over all tokens
  would make XLA gather every token onto every device (2.3x slower on 8 simulated devices).
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  shape = dict(getattr(mesh, "shape", {}) or {})
  return mesh if EXPERT_AXIS in shape and math.prod(shape.values()) > 1 else None


def run_experts(x, experts, gates, w_gate_up, w_down, *, capacity_factor: float = 0.0,
                grouped: str = "auto", mesh=None):
  """x [T, d], experts int [T, k], gates [T, k], w_gate_up [E, d, 2h], w_down [E, h, d] ->
  (y [T, d], keep bool [T, k]). With a mesh of several devices: each device routes its own tokens
  (split over every mesh axis but `tensor`), experts split over `expert` (expert parallel when
  > 1; capacity then holds per device); otherwise on one device.
  grouped: the dropless grouped matmul, "ragged_dot", "tiled" or "auto" (grouped_impl)."""
  mesh, grouped = _sharded_mesh(mesh), grouped_impl(grouped)
  token_axes = () if mesh is None else tuple(a for a in mesh.axis_names if a != _TENSOR_AXIS)
  if mesh is None or x.shape[0] % math.prod(mesh.shape[a] for a in token_axes):
    # One device, or too few tokens to split (decoding a few tokens): XLA gathers the weights.
    return experts_local(x, experts, gates, w_gate_up, w_down, capacity_factor, grouped)
  if w_gate_up.shape[0] % mesh.shape[EXPERT_AXIS]:
    raise ValueError(f"{w_gate_up.shape[0]} experts do not split over a mesh axis "
                     f"{EXPERT_AXIS}={mesh.shape[EXPERT_AXIS]}")
  tokens = P(token_axes)
  body = lambda *a: experts_sharded(*a, capacity_factor=capacity_factor, grouped=grouped)
  return jax.shard_map(body, mesh=mesh, out_specs=(tokens, tokens),
                       in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS), P(EXPERT_AXIS)))(
                           x, experts, gates, w_gate_up, w_down)


def router_aux(logits, probs, experts, keep):
  """The layer's auxiliary values (see the module docstring) from logits [T, E], probs [T, E],
  experts int [T, k] and keep bool [T, k]."""
  num_experts = logits.shape[-1]
  load = jnp.zeros(num_experts, jnp.float32).at[experts.reshape(-1)].add(1.0) / experts.size
  return dict(aux_loss=num_experts * jnp.sum(load * probs.mean(0)),
              z_loss=jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
              load=load, dropped=1.0 - keep.mean(dtype=jnp.float32))


class MoE(nnx.Module):
  """Routed SwiGLU experts over [tokens, d_model] activations -> (output [tokens, d_model], aux).

  Parameters: router [d_model, E] (applied in float32), gate_up [E, d_model, 2 * hidden] (the
  fused gate and up projections, as in SwiGLU), down [E, hidden, d_model], and `shared`, a
  SwiGLU of `shared_hidden` every token passes through (0: none). `grouped`: the dropless
  grouped matmul ("auto", "ragged_dot", "tiled"; see grouped_impl). `mesh`: run expert parallel
  over its `expert` axis (None: the current mesh if one is set, else one device).
  """

  def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, *,
               gating: str = "softmax", shared_hidden: int = 0, capacity_factor: float = 0.0,
               grouped: str = "auto", dropout: float = 0.0, init_std: float = 0.02,
               out_init_std: float | None = None, mesh=None, rngs: nnx.Rngs):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k={top_k}: must lie in [1, num_experts={num_experts}]")
    if gating not in GATINGS:
      raise ValueError(f"gating={gating!r}: must be one of {', '.join(map(repr, GATINGS))}")
    if capacity_factor < 0:
      raise ValueError(f"capacity_factor={capacity_factor}: must be >= 0 (0: dropless)")
    self.num_experts, self.top_k, self.gating = num_experts, top_k, gating
    grouped_impl(grouped)  # checks the name
    self.capacity_factor, self.grouped, self.mesh = capacity_factor, grouped, mesh
    normal = nnx.initializers.normal
    self.router = param(normal(init_std)(rngs.params(), (d_model, num_experts)), EMBED, None)
    self.gate_up = param(normal(init_std)(rngs.params(), (num_experts, d_model, 2 * hidden)),
                         EXPERT, EMBED, MLP)
    self.down = param(normal(out_init_std or init_std)(rngs.params(), (num_experts, hidden, d_model)),
                      EXPERT, MLP, EMBED)
    self.shared = (SwiGLU(d_model, shared_hidden, init_std=init_std, out_init_std=out_init_std,
                          rngs=rngs) if shared_hidden else None)
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x, deterministic=None):
    """x [T, d_model] -> (y [T, d_model], aux: {aux_loss, z_loss, load [E], dropped})."""
    logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    experts, gates, probs = route(logits, self.top_k, self.gating)
    y, keep = run_experts(x, experts, gates, self.gate_up[...], self.down[...],
                          capacity_factor=self.capacity_factor, grouped=self.grouped,
                          mesh=self.mesh)
    if self.shared is not None:
      y = y + self.shared(x)
    return self.dropout(y, deterministic=deterministic), router_aux(logits, probs, experts, keep)


def mean_aux(layers: list) -> dict:
  """The aux dicts of several MoE layers -> their mean, key by key ({} for none)."""
  if not layers:
    return {}
  return {k: sum(a[k] for a in layers) / len(layers) for k in layers[0]}

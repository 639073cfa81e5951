"""Multi-head self-attention with a fused QKV projection; the attention itself is the kernel op.

Grouped-query attention (n_kv_head < n_head), rotary positions and logit soft-capping are
arguments; `decode` runs the same layer against a key/value cache for generation.
"""
import jax.numpy as jnp
from flax import nnx

import llmx_kernels as kernels
from llmx.nn.axes import EMBED, HEADS, with_axes
from llmx.nn.context import attention as context_attention
from llmx.nn.dropout import Dropout
from llmx.nn.precision import dot_general
from llmx.nn.rope import apply_rope

# The values of a config's `model.attention_impl`: "" lets the kernel pick per platform.
ATTENTION_IMPLS = ("",) + tuple(kernels.attention.IMPLEMENTATIONS)


class SelfAttention(nnx.Module):
  """Self-attention over [batch * seq, d_model] activations.

  Activations stay 2-D between layers (XLA:CPU pays for 3-D dense layers with transposes in
  the backward pass); only the attention op sees [batch, seq, heads, head_dim].
  """

  def __init__(self, d_model: int, n_head: int, *, n_kv_head: int | None = None,
               use_bias: bool = True, dropout: float = 0.0, init_std: float = 0.02,
               out_init_std: float | None = None, attention_impl: str | None = None,
               rope_theta: float | None = None, rope_scaling: tuple | None = None,
               logits_soft_cap: float | None = None, qkv_bias: bool | None = None,
               matmul_dtype: str = "float32", rngs: nnx.Rngs):
    """rope_theta: rotate queries and keys by their positions (RoPE) with this base; None: no
    rotation (positions come from a learned table outside). logits_soft_cap: c * tanh(s / c) on
    the attention logits (Gemma 2); None: off. rope_scaling: see llmx.nn.rope.rope_frequencies.
    qkv_bias: biases on the q, k, v projections (None: as use_bias; Qwen2 has them without an
    output bias). matmul_dtype: "bfloat16" rounds the inputs of the four projections to bf16,
    accumulating in float32 (llmx/nn/precision.py); attention itself stays float32."""
    n_kv_head = n_kv_head or n_head
    if d_model % n_head:
      raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
    if n_head % n_kv_head:
      raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
    self.n_head, self.n_kv_head = n_head, n_kv_head
    self.head_dim = d_model // n_head
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(out_init_std or init_std)
    zeros = nnx.initializers.zeros_init()
    qkv_bias = use_bias if qkv_bias is None else qkv_bias
    self.qkv = nnx.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, use_bias=qkv_bias,
                          kernel_init=with_axes(init, EMBED, HEADS),
                          bias_init=with_axes(zeros, HEADS),
                          dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, use_bias=use_bias,
                          kernel_init=with_axes(out_init, HEADS, EMBED),
                          bias_init=with_axes(zeros, EMBED),
                          dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)
    self.attention_impl = attention_impl
    self.rope_theta = rope_theta
    self.rope_scaling = rope_scaling
    self.logits_soft_cap = logits_soft_cap

  def _project(self, x, batch: int, positions):
    """x: [batch * seq, d_model] -> q [batch, seq, h, hd], k and v [batch, seq, kv, hd]."""
    seq = x.shape[0] // batch
    h, kv, hd = self.n_head, self.n_kv_head, self.head_dim
    qkv = self.qkv(x).reshape(batch, seq, h + 2 * kv, hd)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
      q = apply_rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling)
      k = apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)
    return q, k, v

  def __call__(self, x, *, batch: int, is_causal: bool = True, segment_ids=None, positions=None,
               deterministic=None, context=None):
    """x: [batch * seq, d_model] -> [batch * seq, d_model]; segment_ids: [batch, seq] or None;
    positions: int [batch, seq] for RoPE (None: 0, 1, 2, ... in every row).
    context: a llmx.nn.context.ContextParallel when the rows are in its context layout (each a
    piece of a longer sequence; positions are then required): attention spans whole sequences
    across the context axis. None: every row is a whole sequence."""
    seq = x.shape[0] // batch
    q, k, v = self._project(x, batch, positions)
    if context is not None:
      y = context_attention(q, k, v, segment_ids, context, is_causal=is_causal,
                            logits_soft_cap=self.logits_soft_cap)
    else:
      y = kernels.dot_product_attention(
          q, k, v, is_causal=is_causal, query_segment_ids=segment_ids, kv_segment_ids=segment_ids,
          logits_soft_cap=self.logits_soft_cap, implementation=self.attention_impl)
    y = self.out(y.reshape(batch * seq, self.n_head * self.head_dim))
    return self.dropout(y, deterministic=deterministic)

  def decode(self, x, *, batch: int, positions, cache: dict):
    """Causal attention of new tokens to themselves and everything cached before them.

    x: [batch * T, d_model] new tokens; positions: int [batch, T], each row's positions (rows
    may stand at different positions). cache: {"k", "v"}: [batch, max_len, n_kv_head, head_dim],
    where slot j holds the key/value of position j. The new keys/values are written to the slots
    of their positions, then token (b, t) attends to slots 0..positions[b, t]: slots beyond
    hold stale or zero entries and are masked out.
    Returns (y [batch * T, d_model], updated cache).
    """
    seq = x.shape[0] // batch
    q, k, v = self._project(x, batch, positions)
    rows = jnp.arange(batch)[:, None]
    cache = dict(k=cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
                 v=cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype)))
    slots = jnp.arange(cache["k"].shape[1])
    visible = slots[None, None, None, :] <= positions[:, None, :, None]  # [batch, 1, T, max_len]
    y = kernels.dot_product_attention(
        q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask=visible,
        logits_soft_cap=self.logits_soft_cap, implementation=self.attention_impl)
    return self.out(y.reshape(batch * seq, self.n_head * self.head_dim)), cache

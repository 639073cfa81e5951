"""Multi-head self-attention with a fused QKV projection; the attention itself is the kernel op."""
import jax.numpy as jnp
from flax import nnx

import kernels


class SelfAttention(nnx.Module):
  """Self-attention over [batch * seq, d_model] activations.

  Activations stay 2-D between layers (XLA:CPU pays for 3-D dense layers with transposes in
  the backward pass); only the attention op sees [batch, seq, heads, head_dim].
  """

  def __init__(self, d_model: int, n_head: int, *, n_kv_head: int | None = None,
               use_bias: bool = True, dropout: float = 0.0, init_std: float = 0.02,
               out_init_std: float | None = None, attention_impl: str | None = None,
               rngs: nnx.Rngs):
    n_kv_head = n_kv_head or n_head
    if d_model % n_head:
      raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
    if n_head % n_kv_head:
      raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
    self.n_head, self.n_kv_head = n_head, n_kv_head
    self.head_dim = d_model // n_head
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(out_init_std or init_std)
    self.qkv = nnx.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, use_bias=use_bias,
                          kernel_init=init, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, use_bias=use_bias, kernel_init=out_init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.attention_impl = attention_impl

  def __call__(self, x, *, batch: int, is_causal: bool = True, segment_ids=None, deterministic=None):
    """x: [batch * seq, d_model] -> [batch * seq, d_model]; segment_ids: [batch, seq] or None."""
    seq = x.shape[0] // batch
    h, kv, hd = self.n_head, self.n_kv_head, self.head_dim
    qkv = self.qkv(x).reshape(batch, seq, h + 2 * kv, hd)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
    y = kernels.dot_product_attention(
        q, k, v, is_causal=is_causal, query_segment_ids=segment_ids, kv_segment_ids=segment_ids,
        implementation=self.attention_impl)
    y = self.out(y.reshape(batch * seq, h * hd))
    return self.dropout(y, deterministic=deterministic)

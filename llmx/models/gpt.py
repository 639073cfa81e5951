"""GPT: a decoder-only Transformer language model (GPT-2 / nanoGPT shape).

Token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm and an output head tied to the token embeddings (or untied).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from llmx.nn.attention import SelfAttention
from llmx.nn.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  block_size: int = 256
  n_layer: int = 6
  n_head: int = 6
  d_model: int = 384
  dropout: float = 0.0
  bias: bool = True
  tie_embeddings: bool = True
  gelu_approximate: bool = False  # nanoGPT: exact erf GELU; GPT-2 checkpoints: tanh form
  layer_norm_epsilon: float = 1e-5
  attention_impl: str | None = None  # None: the kernel op's best for the backend


class MLP(nnx.Module):
  def __init__(self, d_model: int, *, use_bias: bool, dropout: float, gelu_approximate: bool,
               out_init_std: float, rngs: nnx.Rngs):
    self.fc = nnx.Linear(d_model, 4 * d_model, use_bias=use_bias,
                         kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.proj = nnx.Linear(4 * d_model, d_model, use_bias=use_bias,
                           kernel_init=nnx.initializers.normal(out_init_std), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.gelu_approximate = gelu_approximate

  def __call__(self, x, deterministic=None):
    x = jax.nn.gelu(self.fc(x), approximate=self.gelu_approximate)
    return self.dropout(self.proj(x), deterministic=deterministic)


class Block(nnx.Module):
  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
    out_std = 0.02 / math.sqrt(2 * c.n_layer)
    self.ln_1 = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, use_bias=c.bias)
    self.attn = SelfAttention(c.d_model, c.n_head, use_bias=c.bias, dropout=c.dropout,
                              out_init_std=out_std, attention_impl=c.attention_impl, rngs=rngs)
    self.ln_2 = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, use_bias=c.bias)
    self.mlp = MLP(c.d_model, use_bias=c.bias, dropout=c.dropout,
                   gelu_approximate=c.gelu_approximate, out_init_std=out_std, rngs=rngs)

  def __call__(self, x, *, batch, segment_ids=None, deterministic=None):
    x = x + self.attn(self.ln_1(x), batch=batch, segment_ids=segment_ids,
                      deterministic=deterministic)
    return x + self.mlp(self.ln_2(x), deterministic=deterministic)


class GPT(nnx.Module):
  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    if c.d_model % c.n_head:
      raise ValueError(f"d_model={c.d_model} is not divisible by n_head={c.n_head}")
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(c.vocab_size, c.d_model, embedding_init=init, rngs=rngs)
    self.wpe = nnx.Param(init(rngs.params(), (c.block_size, c.d_model)))
    self.drop = nnx.Dropout(c.dropout, rngs=rngs)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layer)])
    self.ln_f = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, use_bias=c.bias)
    self.lm_head = (None if c.tie_embeddings else
                    nnx.Linear(c.d_model, c.vocab_size, use_bias=False, kernel_init=init, rngs=rngs))

  def hidden_states(self, tokens, *, positions=None, segment_ids=None, deterministic=None):
    """tokens: int [batch, seq] -> final-LayerNorm output [batch * seq, d_model]."""
    batch, seq = tokens.shape
    if seq > self.config.block_size:
      raise ValueError(f"sequence length {seq} exceeds block_size={self.config.block_size}")
    pos = jnp.arange(seq)[None] if positions is None else positions
    x = (self.wte(tokens) + self.wpe[...][pos]).reshape(batch * seq, -1)
    x = self.drop(x, deterministic=deterministic)
    for block in self.blocks:
      x = block(x, batch=batch, segment_ids=segment_ids, deterministic=deterministic)
    return self.ln_f(x)

  def head_weight(self):
    """The output projection as [d_model, vocab]."""
    return self.wte.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def __call__(self, tokens, **kwargs):
    """tokens: int [batch, seq] -> logits float32 [batch, seq, vocab]."""
    batch, seq = tokens.shape
    h = self.hidden_states(tokens, **kwargs)
    return (h @ self.head_weight()).reshape(batch, seq, -1)

  def loss(self, tokens, targets, *, deterministic=None, **kwargs):
    """Mean next-token cross-entropy; the [tokens, vocab] logits are never materialised when the
    fused kernel chunks them."""
    h = self.hidden_states(tokens, deterministic=deterministic, **kwargs)
    return kernels.linear_cross_entropy(h, self.head_weight(), targets.reshape(-1))


def num_params(model: nnx.Module, *, exclude_positions: bool = True) -> int:
  """Parameter count; nanoGPT reports it without the position embeddings."""
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if exclude_positions and isinstance(model, GPT):
    n -= model.wpe[...].size
  return n


def flops_per_token(c: GPTConfig, n_params: int, seq: int) -> float:
  """Training FLOPs per token (PaLM appendix B): 6N for the matmuls with parameters plus
  12 * n_layer * d_model * seq for attention scores and values, forward and backward."""
  return 6 * n_params + 12 * c.n_layer * c.d_model * seq

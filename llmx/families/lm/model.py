"""GPT: a decoder-only Transformer language model (GPT-2 / nanoGPT shape by default).

Token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm and an output head tied to the token embeddings (or untied).

Config switches turn it into a LLaMA-style model piece by piece: rotary positions instead of the
table (`positions="rope"`), RMSNorm (`norm="rmsnorm"`), a SwiGLU MLP (`mlp="swiglu"`),
grouped-query attention (`n_kv_head < n_head`), no biases (`bias=False`), an untied head and
Gemma-2-style soft-capping of the output (and attention) logits.

Decoding (llmx/inference) uses the cache protocol: `init_cache`, `decode_step` and
`reorder_cache` (a key/value cache per layer). Hugging Face GPT-2 folders: `from_pretrained` /
`save_pretrained` in llmx/families/lm/hf.py.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import llmx_kernels as kernels
from llmx.nn.attention import SelfAttention
from llmx.nn.axes import EMBED, MLP as MLP_AXIS, VOCAB, param, with_axes
from llmx.nn.mlp import SwiGLU
from llmx.nn.norms import LayerNorm, RMSNorm
from llmx.nn.remat import remat

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


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
  layer_norm_epsilon: float = 1e-5  # the epsilon of LayerNorm and RMSNorm alike
  attention_impl: str | None = None  # None: the kernel op's best for the backend
  n_kv_head: int | None = None  # None: n_head (multi-head); fewer: grouped-query attention
  positions: str = "learned"  # "learned" table (GPT-2) or "rope" (rotary, no table)
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # ((key, value), ...) as a HF rope_scaling (llmx.nn.rope)
  qkv_bias: bool | None = None  # biases on q, k, v alone (Qwen2); None: as `bias`
  norm: str = "layernorm"  # or "rmsnorm"
  mlp: str = "gelu"  # or "swiglu"
  mlp_hidden: int | None = None  # None: 4 * d_model (gelu), 8/3 * d_model rounded up to 64 (swiglu)
  logits_soft_cap: float | None = None  # c * tanh(logits / c) on the output logits; None: off
  attn_logits_soft_cap: float | None = None  # the same on the attention logits

  def __post_init__(self):
    if self.rope_scaling is not None:  # from JSON (a checkpoint's meta) it comes back as lists
      object.__setattr__(self, "rope_scaling", tuple(tuple(p) for p in self.rope_scaling))
    if self.d_model % self.n_head:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
    if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
      raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
    for field, value, valid in (("positions", self.positions, POSITIONS),
                                ("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS)):
      if value not in valid:
        raise ValueError(f"{field}={value!r}: must be one of {', '.join(map(repr, valid))}")
    if self.positions == "rope" and (self.d_model // self.n_head) % 2:
      raise ValueError(f"positions='rope' needs an even head dim; d_model / n_head = "
                       f"{self.d_model // self.n_head}")
    for field in ("logits_soft_cap", "attn_logits_soft_cap"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(f"{field}={value}: must be > 0, or None for no soft-capping")

  @property
  def hidden_size(self) -> int:
    if self.mlp_hidden:
      return self.mlp_hidden
    if self.mlp == "swiglu":  # as many parameters as the 4x GELU MLP, in 3 matrices
      return -(-8 * self.d_model // 3 // 64) * 64
    return 4 * self.d_model


class MLP(nnx.Module):
  def __init__(self, d_model: int, *, use_bias: bool, dropout: float, gelu_approximate: bool,
               out_init_std: float, rngs: nnx.Rngs, hidden: int | None = None):
    hidden = hidden or 4 * d_model
    zeros = nnx.initializers.zeros_init()
    self.fc = nnx.Linear(d_model, hidden, use_bias=use_bias,
                         kernel_init=with_axes(nnx.initializers.normal(0.02), EMBED, MLP_AXIS),
                         bias_init=with_axes(zeros, MLP_AXIS), rngs=rngs)
    self.proj = nnx.Linear(hidden, d_model, use_bias=use_bias,
                           kernel_init=with_axes(nnx.initializers.normal(out_init_std), MLP_AXIS, EMBED),
                           bias_init=with_axes(zeros, EMBED), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.gelu_approximate = gelu_approximate

  def __call__(self, x, deterministic=None):
    x = jax.nn.gelu(self.fc(x), approximate=self.gelu_approximate)
    return self.dropout(self.proj(x), deterministic=deterministic)


class Block(nnx.Module):
  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
    out_std = 0.02 / math.sqrt(2 * c.n_layer)
    self.ln_1 = make_norm(c)
    self.attn = SelfAttention(c.d_model, c.n_head, n_kv_head=c.n_kv_head, use_bias=c.bias,
                              dropout=c.dropout, out_init_std=out_std,
                              attention_impl=c.attention_impl,
                              rope_theta=c.rope_theta if c.positions == "rope" else None,
                              rope_scaling=c.rope_scaling, qkv_bias=c.qkv_bias,
                              logits_soft_cap=c.attn_logits_soft_cap, rngs=rngs)
    self.ln_2 = make_norm(c)
    if c.mlp == "swiglu":
      self.mlp = SwiGLU(c.d_model, c.hidden_size, use_bias=c.bias, dropout=c.dropout,
                        out_init_std=out_std, rngs=rngs)
    else:
      self.mlp = MLP(c.d_model, use_bias=c.bias, dropout=c.dropout, hidden=c.hidden_size,
                     gelu_approximate=c.gelu_approximate, out_init_std=out_std, rngs=rngs)

  def __call__(self, x, *, batch, segment_ids=None, positions=None, deterministic=None):
    x = x + self.attn(self.ln_1(x), batch=batch, segment_ids=segment_ids, positions=positions,
                      deterministic=deterministic)
    return x + self.mlp(self.ln_2(x), deterministic=deterministic)

  def decode(self, x, *, batch, positions, cache):
    """The block against its layer's key/value cache (see SelfAttention.decode)."""
    y, cache = self.attn.decode(self.ln_1(x), batch=batch, positions=positions, cache=cache)
    x = x + y
    return x + self.mlp(self.ln_2(x), deterministic=True), cache


def make_norm(c: GPTConfig):
  if c.norm == "rmsnorm":
    return RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon)
  return LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, use_bias=c.bias)


class GPT(nnx.Module):
  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, remat: str = "none"):
    """remat: recompute each block's activations in the backward pass ("none", "full", "dots";
    llmx/nn/remat.py): memory for compute, with the same results."""
    c = self.config = config
    self.remat_policy = remat
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(c.vocab_size, c.d_model, embedding_init=with_axes(init, VOCAB, EMBED),
                         rngs=rngs)
    self.wpe = (param(init(rngs.params(), (c.block_size, c.d_model)), None, EMBED)
                if c.positions == "learned" else None)
    self.drop = nnx.Dropout(c.dropout, rngs=rngs)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layer)])
    self.ln_f = make_norm(c)
    self.lm_head = (None if c.tie_embeddings else
                    nnx.Linear(c.d_model, c.vocab_size, use_bias=False,
                               kernel_init=with_axes(init, EMBED, VOCAB), rngs=rngs))

  def _embed(self, tokens, positions):
    """tokens, positions: int [batch, seq] (positions may be [1, seq]) -> [batch * seq, d_model]."""
    batch, seq = tokens.shape
    x = self.wte(tokens)
    if self.wpe is not None:
      x = x + self.wpe[...][positions]
    return x.reshape(batch * seq, -1)

  def hidden_states(self, tokens, *, positions=None, segment_ids=None, attention_mask=None,
                    deterministic=None):
    """tokens: int [batch, seq] -> final-norm output [batch * seq, d_model].

    positions: int [batch, seq] (packed rows restart at 0 per document); default 0..seq-1.
    segment_ids: int [batch, seq]: a token attends only to earlier tokens with its id.
    attention_mask: [batch, seq], 1 on real tokens, 0 on padding (Hugging Face's argument); it
    becomes segment ids, so real tokens never attend to padding.
    """
    batch, seq = tokens.shape
    if seq > self.config.block_size:
      raise ValueError(f"sequence length {seq} exceeds block_size={self.config.block_size}")
    if attention_mask is not None and segment_ids is None:
      segment_ids = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
    pos = jnp.arange(seq)[None] if positions is None else positions
    x = self.drop(self._embed(tokens, pos), deterministic=deterministic)
    rope_positions = None if positions is None else jnp.broadcast_to(positions, (batch, seq))
    def run_block(block, x, segment_ids, positions):
      return block(x, batch=batch, segment_ids=segment_ids, positions=positions,
                   deterministic=deterministic)
    run_block = remat(run_block, self.remat_policy)
    for block in self.blocks:
      x = run_block(block, x, segment_ids, rope_positions)
    return self.ln_f(x)

  def head_weight(self):
    """The output projection as [d_model, vocab]."""
    return self.wte.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def logits(self, h):
    """Final hidden states [..., d_model] -> logits [..., vocab] (soft-capped if configured)."""
    z = h @ self.head_weight()
    cap = self.config.logits_soft_cap
    return z if cap is None else cap * jnp.tanh(z / cap)

  def __call__(self, tokens, **kwargs):
    """tokens (or input_ids): int [batch, seq] -> logits float32 [batch, seq, vocab].

    kwargs: positions, segment_ids, attention_mask, deterministic (see hidden_states).
    """
    batch, seq = tokens.shape
    return self.logits(self.hidden_states(tokens, **kwargs)).reshape(batch, seq, -1)

  def token_losses(self, tokens, targets, *, deterministic=None, **kwargs):
    """Next-token cross-entropy of every position, float32 [batch * seq]; targets equal to -100
    (packing's document ends and padding) have loss 0."""
    h = self.hidden_states(tokens, deterministic=deterministic, **kwargs)
    return self._cross_entropy(h, targets.reshape(-1), reduction="none")

  def loss(self, tokens, targets, *, deterministic=None, **kwargs):
    """Mean next-token cross-entropy over the targets that are not -100; the [tokens, vocab]
    logits are never materialised when the fused kernel chunks them."""
    h = self.hidden_states(tokens, deterministic=deterministic, **kwargs)
    return self._cross_entropy(h, targets.reshape(-1), reduction="mean")

  def _cross_entropy(self, h, targets, *, reduction):
    if self.config.logits_soft_cap is None:
      return kernels.linear_cross_entropy(h, self.head_weight(), targets, reduction=reduction)
    # The fused kernel knows no soft cap: materialise the capped logits.
    logits = self.logits(h).astype(jnp.float32)
    valid = targets != -100
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
    losses = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    if reduction == "none":
      return losses
    return losses.sum() / jnp.maximum(valid.sum(), 1)

  # Decoding: the cache protocol of llmx/inference/protocol.py.
  @property
  def max_decode_len(self) -> int:
    return self.config.block_size

  def init_cache(self, batch: int, max_len: int | None = None, *, dtype=jnp.float32) -> list:
    """An empty key/value cache: per layer {"k", "v"} [batch, max_len, n_kv_head, head_dim]."""
    c = self.config
    max_len = max_len or c.block_size
    shape = (batch, max_len, c.n_kv_head or c.n_head, c.d_model // c.n_head)
    return [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in self.blocks]

  def reorder_cache(self, cache: list, rows) -> list:
    """Row i of the new cache is row rows[i] (int [batch]) of the old one (beam search)."""
    return jax.tree.map(lambda x: x[rows], cache)

  def decode_step(self, tokens, positions, cache: list):
    """Runs new tokens through the model against the cache (inference: no dropout).

    tokens, positions: int [batch, T]: the tokens and their positions (< block_size), which may
    differ between rows; a prompt is T tokens at 0..T-1, a generation step one token per row.
    Returns (final hidden states [batch, T, d_model], cache with their keys/values written).
    """
    batch, seq = tokens.shape
    x = self._embed(tokens, positions)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, batch=batch, positions=positions, cache=layer_cache)
      new_cache.append(layer_cache)
    return self.ln_f(x).reshape(batch, seq, -1), new_cache


def flops_per_token(c: GPTConfig, n_params: int, seq: int) -> float:
  """Training FLOPs per token (PaLM appendix B): 6N for the matmuls with parameters plus
  12 * n_layer * d_model * seq for attention scores and values, forward and backward."""
  return 6 * n_params + 12 * c.n_layer * c.d_model * seq

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
from llmx.nn.dropout import Dropout
from llmx.nn.gelu import gelu
from llmx.nn.mlp import SwiGLU
from llmx.nn.moe import GATINGS, MoE, mean_aux
from llmx.nn.norms import LayerNorm, RMSNorm
from llmx.nn.precision import MATMUL_DTYPES, dot_general
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
  # "bfloat16": the dense layers' matmuls (projections, dense MLP) round their inputs to bf16
  # and accumulate in float32; all else (attention, MoE experts, norms, the output head, the
  # loss, the optimizer) stays float32 (llmx/nn/precision.py). 1.3-1.6x faster train steps on
  # an AVX512-BF16 CPU (results/lm.md).
  matmul_dtype: str = "float32"
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
  # Mixture of experts (llmx/nn/moe.py): layer i (from 0) is MoE when (i + 1) % every_n == 0
  # (1: every layer; 2: layers 1, 3, ...). Experts are SwiGLU whatever `mlp` says.
  moe_num_experts: int = 0  # 0: dense (no MoE layers)
  moe_top_k: int = 2
  moe_every_n_layers: int = 1
  moe_gating: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
  moe_hidden: int | None = None  # each expert's hidden width; None: hidden_size
  moe_shared_expert: bool = False  # a dense SwiGLU of moe_hidden every token also passes through
  moe_capacity_factor: float = 0.0  # 0: dropless; > 0: each expert takes <= cf * T * k / E pairs
  moe_grouped_matmul: str = "auto"  # dropless: "ragged_dot", "tiled" or "auto" (by backend)
  moe_aux_loss_weight: float = 0.01  # load-balancing loss weight (the recipe adds it)
  moe_z_loss_weight: float = 0.001  # router z-loss weight

  def __post_init__(self):
    if self.rope_scaling is not None:  # from JSON (a checkpoint's meta) it comes back as lists
      object.__setattr__(self, "rope_scaling", tuple(tuple(p) for p in self.rope_scaling))
    if self.d_model % self.n_head:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
    if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
      raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
    for field, value, valid in (("positions", self.positions, POSITIONS),
                                ("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                ("matmul_dtype", self.matmul_dtype, MATMUL_DTYPES)):
      if value not in valid:
        raise ValueError(f"{field}={value!r}: must be one of {', '.join(map(repr, valid))}")
    if self.positions == "rope" and (self.d_model // self.n_head) % 2:
      raise ValueError(f"positions='rope' needs an even head dim; d_model / n_head = "
                       f"{self.d_model // self.n_head}")
    for field in ("logits_soft_cap", "attn_logits_soft_cap"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(f"{field}={value}: must be > 0, or None for no soft-capping")
    if self.moe_num_experts:
      if not 1 <= self.moe_top_k <= self.moe_num_experts:
        raise ValueError(f"moe_top_k={self.moe_top_k}: must lie in [1, moe_num_experts="
                         f"{self.moe_num_experts}]")
      if self.moe_gating not in GATINGS:
        raise ValueError(f"moe_gating={self.moe_gating!r}: must be one of "
                         f"{', '.join(map(repr, GATINGS))}")
      if self.moe_every_n_layers < 1:
        raise ValueError(f"moe_every_n_layers={self.moe_every_n_layers}: must be >= 1")

  def is_moe_layer(self, layer: int) -> bool:
    return bool(self.moe_num_experts) and (layer + 1) % self.moe_every_n_layers == 0

  @property
  def hidden_size(self) -> int:
    if self.mlp_hidden:
      return self.mlp_hidden
    if self.mlp == "swiglu":  # as many parameters as the 4x GELU MLP, in 3 matrices
      return -(-8 * self.d_model // 3 // 64) * 64
    return 4 * self.d_model


class MLP(nnx.Module):
  def __init__(self, d_model: int, *, use_bias: bool, dropout: float, gelu_approximate: bool,
               out_init_std: float, rngs: nnx.Rngs, hidden: int | None = None,
               matmul_dtype: str = "float32"):
    hidden = hidden or 4 * d_model
    zeros = nnx.initializers.zeros_init()
    self.fc = nnx.Linear(d_model, hidden, use_bias=use_bias,
                         kernel_init=with_axes(nnx.initializers.normal(0.02), EMBED, MLP_AXIS),
                         bias_init=with_axes(zeros, MLP_AXIS),
                         dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.proj = nnx.Linear(hidden, d_model, use_bias=use_bias,
                           kernel_init=with_axes(nnx.initializers.normal(out_init_std), MLP_AXIS, EMBED),
                           bias_init=with_axes(zeros, EMBED),
                           dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)
    self.gelu_approximate = gelu_approximate

  def __call__(self, x, deterministic=None):
    x = gelu(self.fc(x), approximate=self.gelu_approximate)
    return self.dropout(self.proj(x), deterministic=deterministic)


class Block(nnx.Module):
  def __init__(self, c: GPTConfig, *, layer: int = 0, mesh=None, rngs: nnx.Rngs):
    """layer: the block's index (which blocks are MoE); mesh: for expert parallelism (MoE)."""
    # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
    out_std = 0.02 / math.sqrt(2 * c.n_layer)
    self.ln_1 = make_norm(c)
    self.attn = SelfAttention(c.d_model, c.n_head, n_kv_head=c.n_kv_head, use_bias=c.bias,
                              dropout=c.dropout, out_init_std=out_std,
                              attention_impl=c.attention_impl,
                              rope_theta=c.rope_theta if c.positions == "rope" else None,
                              rope_scaling=c.rope_scaling, qkv_bias=c.qkv_bias,
                              logits_soft_cap=c.attn_logits_soft_cap,
                              matmul_dtype=c.matmul_dtype, rngs=rngs)
    self.ln_2 = make_norm(c)
    if c.is_moe_layer(layer):
      hidden = c.moe_hidden or c.hidden_size
      self.mlp = MoE(c.d_model, hidden, c.moe_num_experts, c.moe_top_k, gating=c.moe_gating,
                     shared_hidden=hidden if c.moe_shared_expert else 0,
                     capacity_factor=c.moe_capacity_factor, grouped=c.moe_grouped_matmul,
                     dropout=c.dropout,
                     out_init_std=out_std, mesh=mesh, rngs=rngs)
    elif c.mlp == "swiglu":
      self.mlp = SwiGLU(c.d_model, c.hidden_size, use_bias=c.bias, dropout=c.dropout,
                        out_init_std=out_std, matmul_dtype=c.matmul_dtype, rngs=rngs)
    else:
      self.mlp = MLP(c.d_model, use_bias=c.bias, dropout=c.dropout, hidden=c.hidden_size,
                     gelu_approximate=c.gelu_approximate, out_init_std=out_std,
                     matmul_dtype=c.matmul_dtype, rngs=rngs)

  def __call__(self, x, *, batch, segment_ids=None, positions=None, deterministic=None,
               context=None, return_aux=False):
    """-> the block's output; with return_aux, (that, the MoE layer's aux values or {})."""
    x = x + self.attn(self.ln_1(x), batch=batch, segment_ids=segment_ids, positions=positions,
                      deterministic=deterministic, context=context)
    y, aux = self.feed_forward(self.ln_2(x), deterministic)
    return (x + y, aux) if return_aux else x + y

  def feed_forward(self, x, deterministic):
    """-> (MLP output, the MoE layer's aux values or {} for a dense MLP)."""
    if isinstance(self.mlp, MoE):
      return self.mlp(x, deterministic=deterministic)
    return self.mlp(x, deterministic=deterministic), {}

  def decode(self, x, *, batch, positions, cache):
    """The block against its layer's key/value cache (see SelfAttention.decode)."""
    y, cache = self.attn.decode(self.ln_1(x), batch=batch, positions=positions, cache=cache)
    x = x + y
    return x + self.feed_forward(self.ln_2(x), True)[0], cache


def make_norm(c: GPTConfig):
  if c.norm == "rmsnorm":
    return RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon)
  return LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, use_bias=c.bias)


class GPT(nnx.Module):
  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, remat: str = "none", mesh=None):
    """remat: recompute each block's activations in the backward pass ("none", "full", "dots";
    llmx/nn/remat.py): memory for compute, with the same results. mesh: MoE layers route each
    device's tokens on it and split the experts over its `expert` axis (llmx/nn/moe.py)."""
    c = self.config = config
    self.remat_policy = remat
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(c.vocab_size, c.d_model, embedding_init=with_axes(init, VOCAB, EMBED),
                         rngs=rngs)
    self.wpe = (param(init(rngs.params(), (c.block_size, c.d_model)), None, EMBED)
                if c.positions == "learned" else None)
    self.drop = Dropout(c.dropout, rngs=rngs)
    self.blocks = nnx.List([Block(c, layer=i, mesh=mesh, rngs=rngs) for i in range(c.n_layer)])
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
                    deterministic=None, return_aux=False, context=None):
    """tokens: int [batch, seq] -> final-norm output [batch * seq, d_model]; with return_aux,
    (that, the MoE layers' aux values averaged over them: {} for a dense model).

    positions: int [batch, seq] (packed rows restart at 0 per document); default 0..seq-1.
    segment_ids: int [batch, seq]: a token attends only to earlier tokens with its id.
    attention_mask: [batch, seq], 1 on real tokens, 0 on padding (Hugging Face's argument); it
    becomes segment ids, so real tokens never attend to padding.
    context: a llmx.nn.context.ContextParallel when the rows are in its context layout (pieces of
    longer sequences, split over the context axis; positions required): only attention differs.
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
                   deterministic=deterministic, context=context, return_aux=True)
    run_block = remat(run_block, self.remat_policy)
    aux = []
    for block in self.blocks:
      x, layer_aux = run_block(block, x, segment_ids, rope_positions)
      aux += [layer_aux] if layer_aux else []
    return (self.ln_f(x), mean_aux(aux)) if return_aux else self.ln_f(x)

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

  def loss(self, tokens, targets, *, deterministic=None, return_aux=False, **kwargs):
    """Mean next-token cross-entropy over the targets that are not -100; the [tokens, vocab]
    logits are never materialised when the fused kernel chunks them. return_aux: (that, the MoE
    aux values of hidden_states), which the recipe weighs into the training loss."""
    h, aux = self.hidden_states(tokens, deterministic=deterministic, return_aux=True, **kwargs)
    loss = self._cross_entropy(h, targets.reshape(-1), reduction="mean")
    return (loss, aux) if return_aux else loss

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

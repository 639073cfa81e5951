"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

An encoder of self-attention + MLP layers reads the source; a decoder of masked (causal)
self-attention, cross-attention to the encoder output and MLP layers predicts the target one
token at a time. Options: pre-LN (`norm="pre"`, a final LayerNorm after each stack; trains
without warm-up tricks) or the paper's post-LN (`norm="post"`), sinusoidal or learned
positions, one embedding table for source and target (`share_embeddings`, for a shared
vocabulary) and an output projection tied to the target embeddings (`tie_output`).

Padding is id `pad_id`, on the right. The encoder's self-attention gets segment ids (1 on real
tokens, 0 on padding) so real tokens never see padding; the cross-attention gets a mask over the
source's real tokens; the decoder's causal self-attention never reaches right padding.

Activations are 2-D [batch * seq, d_model] between layers (faster on XLA:CPU, shared/FACTS.md);
only attention sees [batch, seq, heads, head_dim]. Decoding (llmx/inference) uses the cache
protocol: `init_cache` encodes the source once and holds the cross-attention keys/values of its
encoder output beside the decoder's self-attention cache; `decode_step`, `reorder_cache`.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import llmx_kernels as kernels
from llmx.nn.attention import SelfAttention
from llmx.nn.axes import EMBED, HEADS, MLP as MLP_AXIS, VOCAB, param, with_axes
from llmx.nn.dropout import Dropout
from llmx.nn.norms import LayerNorm

NORMS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int                 # shared by source and target
  max_len: int = 128              # positions of a source or target sequence
  d_model: int = 256
  n_head: int = 4
  n_encoder_layers: int = 3
  n_decoder_layers: int = 3
  mlp_hidden: int = 1024
  dropout: float = 0.1
  norm: str = "pre"               # "pre": LayerNorm before each sublayer; "post": after (paper)
  positions: str = "sinusoidal"   # or "learned"
  share_embeddings: bool = True   # one table for source and target tokens
  tie_output: bool = True         # logits = h @ target_embedding^T
  pad_id: int = 0
  attention_impl: str | None = None
  layer_norm_epsilon: float = 1e-5

  def __post_init__(self):
    if self.d_model % self.n_head:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
    for field, value, valid in (("norm", self.norm, NORMS), ("positions", self.positions, POSITIONS)):
      if value not in valid:
        raise ValueError(f"{field}={value!r}: must be one of {', '.join(map(repr, valid))}")


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """The paper's table: [length, d_model], sin on even features, cos on odd ones."""
  pos = np.arange(length)[:, None]
  rates = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)
  table = np.zeros((length, d_model), np.float32)
  table[:, 0::2] = np.sin(pos * rates)
  table[:, 1::2] = np.cos(pos * rates[:d_model // 2])
  return table


class FeedForward(nnx.Module):
  """ReLU MLP over [tokens, d_model] (the paper's position-wise feed-forward layer)."""

  def __init__(self, d_model: int, hidden: int, *, dropout: float, rngs: nnx.Rngs):
    init, zeros = nnx.initializers.xavier_uniform(), nnx.initializers.zeros_init()
    self.fc = nnx.Linear(d_model, hidden, kernel_init=with_axes(init, EMBED, MLP_AXIS),
                         bias_init=with_axes(zeros, MLP_AXIS), rngs=rngs)
    self.proj = nnx.Linear(hidden, d_model, kernel_init=with_axes(init, MLP_AXIS, EMBED),
                           bias_init=with_axes(zeros, EMBED), rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x, deterministic=None):
    return self.dropout(self.proj(jax.nn.relu(self.fc(x))), deterministic=deterministic)


class CrossAttention(nnx.Module):
  """Decoder queries attend to the encoder output (the memory)."""

  def __init__(self, d_model: int, n_head: int, *, dropout: float,
               attention_impl: str | None, rngs: nnx.Rngs):
    self.n_head, self.head_dim = n_head, d_model // n_head
    init, zeros = nnx.initializers.xavier_uniform(), nnx.initializers.zeros_init()
    self.q = nnx.Linear(d_model, d_model, kernel_init=with_axes(init, EMBED, HEADS),
                        bias_init=with_axes(zeros, HEADS), rngs=rngs)
    self.kv = nnx.Linear(d_model, 2 * d_model, kernel_init=with_axes(init, EMBED, HEADS),
                         bias_init=with_axes(zeros, HEADS), rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, kernel_init=with_axes(init, HEADS, EMBED),
                          bias_init=with_axes(zeros, EMBED), rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)
    self.attention_impl = attention_impl

  def memory_kv(self, memory, batch: int) -> dict:
    """memory [batch * S, d_model] -> {"k", "v"}: [batch, S, n_head, head_dim]."""
    kv = self.kv(memory).reshape(batch, -1, 2 * self.n_head, self.head_dim)
    return dict(k=kv[:, :, :self.n_head], v=kv[:, :, self.n_head:])

  def __call__(self, x, memory_kv: dict, src_valid, *, batch: int, deterministic=None):
    """x [batch * T, d_model]; src_valid bool [batch, S]: True on real source tokens, which are
    the only keys any query sees."""
    q = self.q(x).reshape(batch, -1, self.n_head, self.head_dim)
    y = kernels.dot_product_attention(q, memory_kv["k"], memory_kv["v"],
                                      mask=src_valid[:, None, None, :],
                                      implementation=self.attention_impl)
    y = self.out(y.reshape(x.shape[0], self.n_head * self.head_dim))
    return self.dropout(y, deterministic=deterministic)


class EncoderLayer(nnx.Module):
  def __init__(self, c: TransformerConfig, *, rngs: nnx.Rngs):
    self.pre_norm = c.norm == "pre"
    self.attn = SelfAttention(c.d_model, c.n_head, dropout=c.dropout,
                              init_std=math.sqrt(1 / c.d_model), attention_impl=c.attention_impl,
                              rngs=rngs)
    self.ln_attn = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon)
    self.mlp = FeedForward(c.d_model, c.mlp_hidden, dropout=c.dropout, rngs=rngs)
    self.ln_mlp = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon)

  def __call__(self, x, *, batch: int, segment_ids, deterministic=None):
    attn = lambda h: self.attn(h, batch=batch, is_causal=False, segment_ids=segment_ids,
                               deterministic=deterministic)
    mlp = lambda h: self.mlp(h, deterministic=deterministic)
    return _residual(_residual(x, attn, self.ln_attn, self.pre_norm), mlp, self.ln_mlp,
                     self.pre_norm)


class DecoderLayer(nnx.Module):
  def __init__(self, c: TransformerConfig, *, rngs: nnx.Rngs):
    self.pre_norm = c.norm == "pre"
    self.self_attn = SelfAttention(c.d_model, c.n_head, dropout=c.dropout,
                                   init_std=math.sqrt(1 / c.d_model),
                                   attention_impl=c.attention_impl, rngs=rngs)
    self.ln_self = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon)
    self.cross_attn = CrossAttention(c.d_model, c.n_head, dropout=c.dropout,
                                     attention_impl=c.attention_impl, rngs=rngs)
    self.ln_cross = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon)
    self.mlp = FeedForward(c.d_model, c.mlp_hidden, dropout=c.dropout, rngs=rngs)
    self.ln_mlp = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon)

  def __call__(self, x, memory_kv, src_valid, *, batch: int, deterministic=None):
    self_attn = lambda h: self.self_attn(h, batch=batch, is_causal=True,
                                         deterministic=deterministic)
    return self._after_self(_residual(x, self_attn, self.ln_self, self.pre_norm), memory_kv,
                            src_valid, batch=batch, deterministic=deterministic)

  def _after_self(self, x, memory_kv, src_valid, *, batch, deterministic):
    cross = lambda h: self.cross_attn(h, memory_kv, src_valid, batch=batch,
                                      deterministic=deterministic)
    mlp = lambda h: self.mlp(h, deterministic=deterministic)
    x = _residual(x, cross, self.ln_cross, self.pre_norm)
    return _residual(x, mlp, self.ln_mlp, self.pre_norm)

  def decode(self, x, memory_kv, src_valid, *, batch: int, positions, cache: dict):
    """New tokens against the self-attention cache (SelfAttention.decode); no dropout.

    memory_kv and src_valid are per source, and the `batch` rows a multiple of the sources:
    the rows of a source (its beams or samples) fold into the query axis of its cross-attention.
    """
    if self.pre_norm:
      y, cache = self.self_attn.decode(self.ln_self(x), batch=batch, positions=positions,
                                       cache=cache)
      x = x + y
    else:
      y, cache = self.self_attn.decode(x, batch=batch, positions=positions, cache=cache)
      x = self.ln_self(x + y)
    return self._after_self(x, memory_kv, src_valid, batch=src_valid.shape[0],
                            deterministic=True), cache


def _residual(x, sublayer, norm, pre_norm: bool):
  """Pre-LN: x + f(norm(x)); post-LN (paper): norm(x + f(x))."""
  return x + sublayer(norm(x)) if pre_norm else norm(x + sublayer(x))


class Transformer(nnx.Module):
  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    # fairseq's convention: tables ~ N(0, d^-1/2), scaled by sqrt(d) on the way in, so token
    # vectors have unit scale next to the positions, and tied logits start small.
    init = with_axes(nnx.initializers.normal(c.d_model ** -0.5), VOCAB, EMBED)
    self.tgt_embed = nnx.Embed(c.vocab_size, c.d_model, embedding_init=init, rngs=rngs)
    self.src_embed = (None if c.share_embeddings else
                      nnx.Embed(c.vocab_size, c.d_model, embedding_init=init, rngs=rngs))
    if c.positions == "learned":
      self.pos_table = param(nnx.initializers.normal(0.02)(rngs.params(), (c.max_len, c.d_model)),
                             None, EMBED)
    else:
      self.pos_table = None
    self.drop = Dropout(c.dropout, rngs=rngs)
    self.encoder = nnx.List([EncoderLayer(c, rngs=rngs) for _ in range(c.n_encoder_layers)])
    self.decoder = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.n_decoder_layers)])
    # Pre-LN stacks end in a LayerNorm; post-LN layers already end in one.
    self.enc_norm = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon) if c.norm == "pre" else None
    self.dec_norm = LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon) if c.norm == "pre" else None
    self.out_proj = (None if c.tie_output else
                     nnx.Linear(c.d_model, c.vocab_size, use_bias=False,
                                kernel_init=with_axes(nnx.initializers.normal(c.d_model ** -0.5),
                                                      EMBED, VOCAB), rngs=rngs))

  # ------------------------------------------------------------------ pieces
  def _positions(self, positions):
    if self.pos_table is not None:
      return self.pos_table[...][positions]
    return jnp.asarray(sinusoidal_positions(self.config.max_len, self.config.d_model))[positions]

  def embed(self, tokens, positions=None, *, source: bool, deterministic=None):
    """tokens int [batch, seq] -> [batch * seq, d_model]: scaled embeddings plus positions."""
    batch, seq = tokens.shape
    self.check_length(seq)
    if positions is None:
      positions = jnp.arange(seq)[None]
    table = self.src_embed if source and self.src_embed is not None else self.tgt_embed
    x = table(tokens) * math.sqrt(self.config.d_model) + self._positions(positions)
    return self.drop(x.reshape(batch * seq, -1), deterministic=deterministic)

  def check_length(self, seq: int):
    if seq > self.config.max_len:
      raise ValueError(f"sequence of {seq} tokens exceeds the model's max_len="
                       f"{self.config.max_len}")

  def encode(self, src, *, deterministic=None):
    """src int [batch, S] (right-padded with pad_id) -> (memory [batch * S, d_model],
    src_valid bool [batch, S])."""
    batch = src.shape[0]
    src_valid = src != self.config.pad_id
    x = self.embed(src, source=True, deterministic=deterministic)
    segment_ids = src_valid.astype(jnp.int32)
    for layer in self.encoder:
      x = layer(x, batch=batch, segment_ids=segment_ids, deterministic=deterministic)
    return (self.enc_norm(x) if self.enc_norm is not None else x), src_valid

  def memory_kv(self, memory, batch: int) -> list:
    """Each decoder layer's cross-attention keys/values of the memory."""
    return [layer.cross_attn.memory_kv(memory, batch) for layer in self.decoder]

  def decoder_layers(self, x, memory, src_valid, *, batch: int, deterministic=None):
    """Embedded target x [batch * T, d_model] -> final decoder states [batch * T, d_model]."""
    for layer, kv in zip(self.decoder, self.memory_kv(memory, batch)):
      x = layer(x, kv, src_valid, batch=batch, deterministic=deterministic)
    return self.dec_norm(x) if self.dec_norm is not None else x

  def decode(self, tgt_in, memory, src_valid, *, deterministic=None):
    """tgt_in int [batch, T] (<s> first) -> decoder states [batch * T, d_model]."""
    x = self.embed(tgt_in, source=False, deterministic=deterministic)
    return self.decoder_layers(x, memory, src_valid, batch=tgt_in.shape[0],
                               deterministic=deterministic)

  def output_weight(self):
    """[d_model, vocab]."""
    return self.tgt_embed.embedding[...].T if self.out_proj is None else self.out_proj.kernel[...]

  def logits(self, h):
    return h @ self.output_weight()

  def __call__(self, src, tgt_in, *, deterministic=None):
    """-> logits [batch, T, vocab]."""
    memory, src_valid = self.encode(src, deterministic=deterministic)
    h = self.decode(tgt_in, memory, src_valid, deterministic=deterministic)
    return self.logits(h).reshape(*tgt_in.shape, -1)

  def loss(self, src, tgt_in, tgt_out, *, label_smoothing: float = 0.0, deterministic=None):
    """Mean label-smoothed cross-entropy over the labels that are not -100; the
    [tokens, vocab] logits go through the fused kernel."""
    memory, src_valid = self.encode(src, deterministic=deterministic)
    h = self.decode(tgt_in, memory, src_valid, deterministic=deterministic)
    return kernels.linear_cross_entropy(h, self.output_weight(), tgt_out.reshape(-1),
                                        label_smoothing=label_smoothing)

  # ------------------------------------------------------------------ cached decoding
  # The cache protocol of llmx/inference/protocol.py.
  @property
  def max_decode_len(self) -> int:
    return self.config.max_len

  def init_cache(self, batch: int, max_len: int, src) -> dict:
    """The decoding state of `batch` target rows for the sources src int [sources, S]: the
    cross-attention keys/values of their encoder output and the source mask, once per source,
    and empty self-attention caches ([batch, max_len, heads, head_dim] per layer). batch is a
    multiple of sources: rows i*r..i*r+r-1 decode source i."""
    sources = src.shape[0]
    if batch % sources:
      raise ValueError(f"batch={batch} target rows is not a multiple of the {sources} sources")
    memory, src_valid = self.encode(src, deterministic=True)
    c = self.config
    shape = (batch, max_len, c.n_head, c.d_model // c.n_head)
    return dict(self_kv=[dict(k=jnp.zeros(shape, memory.dtype), v=jnp.zeros(shape, memory.dtype))
                         for _ in self.decoder],
                cross_kv=self.memory_kv(memory, sources), src_valid=src_valid)

  def decode_step(self, tokens, positions, cache: dict):
    """tokens, positions int [batch, T] -> (decoder states [batch, T, d_model], cache)."""
    batch, seq = tokens.shape
    x = self.embed(tokens, positions, source=False, deterministic=True)
    new_self = []
    for layer, self_kv, cross_kv in zip(self.decoder, cache["self_kv"], cache["cross_kv"]):
      x, self_kv = layer.decode(x, cross_kv, cache["src_valid"], batch=batch,
                                positions=positions, cache=self_kv)
      new_self.append(self_kv)
    if self.dec_norm is not None:
      x = self.dec_norm(x)
    return x.reshape(batch, seq, -1), dict(cache, self_kv=new_self)

  def reorder_cache(self, cache: dict, rows) -> dict:
    """Row i of the new cache is row rows[i] (int [batch]) of the old one (beam search). Rows
    move only among the rows of their source, so the per-source keys/values stay as they are."""
    return dict(cache, self_kv=jax.tree.map(lambda x: x[rows], cache["self_kv"]))

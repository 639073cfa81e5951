"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019) and its task heads.

Token + position + token-type embeddings with a LayerNorm, then post-LayerNorm blocks as in the
original BERT (self-attention, residual, LayerNorm; erf-GELU MLP, residual, LayerNorm), and a
pooler (dense + tanh over the [CLS] position). Heads: masked LM (a dense + GELU + LayerNorm
transform, decoder tied to the word embeddings, own bias), next sentence prediction, sequence
classification, token classification and extractive QA (start/end logits).

Padding reaches the attention kernel as segment ids: 1 for real tokens, 0 for padding, so a real
token never attends to padding and a sentence's output does not depend on how much padding
follows it. Activations stay 2-D ([batch * seq, hidden]) between layers (faster on XLA:CPU).

Loading a Hugging Face folder: `llmx.families.bert.hf.from_pretrained(path)`; its tokenizer:
`llmx.data.wordpiece.WordPieceTokenizer.from_folder(path)`.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import llmx_kernels as kernels
from llmx.errors import LlmxError
from llmx.nn.attention import SelfAttention
from llmx.nn.dropout import Dropout
from llmx.nn.gelu import gelu
from llmx.nn.norms import LayerNorm
from llmx.train import losses
from llmx.train.losses import IGNORE_INDEX



class SequenceTooLongError(LlmxError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  intermediate_size: int = 1024
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1              # hidden dropout; the attention kernel has no probability dropout
  layer_norm_epsilon: float = 1e-12
  initializer_range: float = 0.02
  gelu_approximate: bool = False    # BERT: exact erf GELU ("gelu"); "gelu_new" is the tanh form
  attention_impl: str | None = None  # None: the kernel op's best for the backend


class BertOutput(NamedTuple):
  last_hidden_state: jax.Array  # [batch, seq, hidden]
  pooler_output: jax.Array      # [batch, hidden]: tanh(dense(hidden state of [CLS]))


class Embeddings(nnx.Module):
  def __init__(self, c: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(c.initializer_range)
    self.word = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=init, rngs=rngs)
    self.position = nnx.Param(init(rngs.params(), (c.max_position_embeddings, c.hidden_size)))
    self.token_type = nnx.Param(init(rngs.params(), (c.type_vocab_size, c.hidden_size)))
    self.norm = LayerNorm(c.hidden_size, epsilon=c.layer_norm_epsilon)
    self.dropout = Dropout(c.dropout, rngs=rngs)

  def __call__(self, input_ids, token_type_ids, deterministic=None):
    """input_ids, token_type_ids: int [batch, seq] -> [batch * seq, hidden]."""
    batch, seq = input_ids.shape
    x = self.word(input_ids) + self.position[...][:seq][None] + self.token_type[...][token_type_ids]
    return self.dropout(self.norm(x.reshape(batch * seq, -1)), deterministic=deterministic)


class EncoderLayer(nnx.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  def __init__(self, c: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(c.initializer_range)
    self.attn = SelfAttention(c.hidden_size, c.num_heads, use_bias=True, dropout=c.dropout,
                              init_std=c.initializer_range, attention_impl=c.attention_impl,
                              rngs=rngs)
    self.attn_norm = LayerNorm(c.hidden_size, epsilon=c.layer_norm_epsilon)
    self.fc_in = nnx.Linear(c.hidden_size, c.intermediate_size, kernel_init=init, rngs=rngs)
    self.fc_out = nnx.Linear(c.intermediate_size, c.hidden_size, kernel_init=init, rngs=rngs)
    self.mlp_dropout = Dropout(c.dropout, rngs=rngs)
    self.mlp_norm = LayerNorm(c.hidden_size, epsilon=c.layer_norm_epsilon)
    self.gelu_approximate = c.gelu_approximate

  def __call__(self, x, *, batch, segment_ids, deterministic=None):
    x = self.attn_norm(x + self.attn(x, batch=batch, is_causal=False, segment_ids=segment_ids,
                                     deterministic=deterministic))
    h = gelu(self.fc_in(x), approximate=self.gelu_approximate)
    return self.mlp_norm(x + self.mlp_dropout(self.fc_out(h), deterministic=deterministic))


class BertModel(nnx.Module):
  """The encoder: `model(input_ids, attention_mask=, token_type_ids=)` -> BertOutput."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    if c.hidden_size % c.num_heads:
      raise ValueError(f"hidden_size={c.hidden_size} is not divisible by num_heads={c.num_heads}")
    self.embeddings = Embeddings(c, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
    self.pooler = nnx.Linear(c.hidden_size, c.hidden_size,
                             kernel_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)

  def encode(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    """input_ids: int [batch, seq]; attention_mask: 1 real / 0 padding [batch, seq] or None (all
    real); token_type_ids: [batch, seq] or None (all 0) -> last hidden state [batch * seq, hidden]."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq]; got shape {input_ids.shape}")
    batch, seq = input_ids.shape
    if seq > self.config.max_position_embeddings:
      raise SequenceTooLongError(
          f"sequence length {seq} exceeds the model's max_position_embeddings="
          f"{self.config.max_position_embeddings}; truncate the input (e.g. max_length="
          f"{self.config.max_position_embeddings} in the tokenizer)")
    for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if x is not None and tuple(x.shape) != (batch, seq):
        raise ValueError(f"{name} must have the shape of input_ids {(batch, seq)}; got {tuple(x.shape)}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    segment_ids = None if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, batch=batch, segment_ids=segment_ids, deterministic=deterministic)
    return x

  def pool(self, hidden, batch: int):
    """hidden [batch * seq, hidden] -> tanh(dense(the [CLS] row)) [batch, hidden]."""
    cls = hidden.reshape(batch, -1, hidden.shape[-1])[:, 0]
    return jnp.tanh(self.pooler(cls))

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    batch, seq = jnp.shape(input_ids)
    h = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return BertOutput(h.reshape(batch, seq, -1), self.pool(h, batch))


def mean_pool(last_hidden_state, attention_mask):
  """sentence-transformers' mean pooling: [batch, seq, hidden], [batch, seq] -> [batch, hidden]."""
  mask = jnp.asarray(attention_mask, last_hidden_state.dtype)[..., None]
  return (last_hidden_state * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


def sentence_embeddings(last_hidden_state, attention_mask):
  """Mean pooling then L2 normalisation (torch.nn.functional.normalize, eps 1e-12), as
  sentence-transformers' all-MiniLM-L6-v2: [batch, hidden], unit length."""
  pooled = mean_pool(last_hidden_state, attention_mask)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def _accuracy(logits, labels):
  valid = labels != IGNORE_INDEX
  return ((jnp.argmax(logits, -1) == labels) & valid).sum() / jnp.maximum(valid.sum(), 1)


class BertForPreTraining(nnx.Module):
  """MLM + NSP heads over a BertModel (names as in Hugging Face's `cls.predictions` and
  `cls.seq_relationship`)."""

  def __init__(self, bert: BertModel, *, rngs: nnx.Rngs):
    c = bert.config
    init = nnx.initializers.normal(c.initializer_range)
    self.bert = bert
    self.mlm_dense = nnx.Linear(c.hidden_size, c.hidden_size, kernel_init=init, rngs=rngs)
    self.mlm_norm = LayerNorm(c.hidden_size, epsilon=c.layer_norm_epsilon)
    self.mlm_bias = nnx.Param(jnp.zeros((c.vocab_size,), jnp.float32))
    self.nsp = nnx.Linear(c.hidden_size, 2, kernel_init=init, rngs=rngs)
    # nnx's model.eval() sets this to True: MLM accuracy needs the [N, vocab] logits that the
    # fused loss avoids, so they are computed in evaluation only.
    self.deterministic = False

  def mlm_transform(self, hidden):
    """[N, hidden] -> [N, hidden]: the transform before the tied decoder."""
    h = gelu(self.mlm_dense(hidden), approximate=self.bert.config.gelu_approximate)
    return self.mlm_norm(h)

  def mlm_logits(self, hidden):
    """[N, hidden] -> [N, vocab]."""
    return self.mlm_transform(hidden) @ self.bert.embeddings.word.embedding[...].T + self.mlm_bias[...]

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    """-> (MLM logits [batch, seq, vocab], NSP logits [batch, 2]; class 0 = B follows A)."""
    batch, seq = jnp.shape(input_ids)
    h = self.bert.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return self.mlm_logits(h).reshape(batch, seq, -1), self.nsp(self.bert.pool(h, batch))

  def loss(self, input_ids, attention_mask, token_type_ids, mlm_labels, nsp_labels, *,
           mlm_positions=None, deterministic=None):
    """MLM + NSP loss and metrics.

    mlm_labels: the original token at each selected position, IGNORE_INDEX elsewhere; either
      [batch, seq] (mlm_positions None) or [batch, P] for the positions mlm_positions [batch, P]
      (gathering the ~15% selected rows first saves the transform and vocab matmul elsewhere).
    nsp_labels: [batch], 0 = B is A's continuation, 1 = B is random.
    -> (mlm_loss + nsp_loss, {mlm_loss, nsp_loss, nsp_accuracy[, mlm_accuracy in eval mode]}).
    """
    batch, seq = input_ids.shape
    h = self.bert.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    if mlm_positions is not None:
      rows = (mlm_positions + seq * jnp.arange(batch)[:, None]).reshape(-1)
      selected = h[rows]
    else:
      selected = h
    labels = mlm_labels.reshape(-1)
    t = self.mlm_transform(selected)
    # The decoder bias folds into the fused loss as one more input feature that is always 1.
    weight = jnp.concatenate([self.bert.embeddings.word.embedding[...].T, self.mlm_bias[...][None]], 0)
    t1 = jnp.concatenate([t, jnp.ones((t.shape[0], 1), t.dtype)], 1)
    mlm_loss = kernels.linear_cross_entropy(t1, weight, labels, ignore_index=IGNORE_INDEX)
    nsp_logits = self.nsp(self.bert.pool(h, batch))
    nsp_loss = losses.cross_entropy(nsp_logits, nsp_labels)
    metrics = dict(mlm_loss=mlm_loss, nsp_loss=nsp_loss, nsp_accuracy=_accuracy(nsp_logits, nsp_labels))
    if self.deterministic or deterministic:
      metrics["mlm_accuracy"] = _accuracy(t1 @ weight, labels)
    return mlm_loss + nsp_loss, metrics


class BertForSequenceClassification(nnx.Module):
  """pooling "cls": the pooler output (original BERT); "mean": mean of the real tokens' hidden
  states (what sentence-transformers models such as all-MiniLM-L6-v2 were trained with)."""

  def __init__(self, bert: BertModel, num_labels: int, *, pooling: str = "cls",
               dropout: float | None = None, rngs: nnx.Rngs):
    if pooling not in ("cls", "mean"):
      raise ValueError(f"pooling={pooling!r}: must be 'cls' or 'mean'")
    c = bert.config
    self.bert = bert
    self.pooling = pooling
    self.dropout = Dropout(c.dropout if dropout is None else dropout, rngs=rngs)
    self.classifier = nnx.Linear(c.hidden_size, num_labels,
                                 kernel_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    """-> logits [batch, num_labels]."""
    batch, seq = jnp.shape(input_ids)
    h = self.bert.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    if self.pooling == "cls":
      pooled = self.bert.pool(h, batch)
    else:
      mask = jnp.ones((batch, seq)) if attention_mask is None else attention_mask
      pooled = mean_pool(h.reshape(batch, seq, -1), mask)
    return self.classifier(self.dropout(pooled, deterministic=deterministic))

  def loss(self, batch, deterministic=None):
    logits = self(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                  deterministic=deterministic)
    return losses.cross_entropy(logits, batch["labels"]), dict(accuracy=_accuracy(logits, batch["labels"]))


class BertForTokenClassification(nnx.Module):
  def __init__(self, bert: BertModel, num_labels: int, *, dropout: float | None = None,
               rngs: nnx.Rngs):
    c = bert.config
    self.bert = bert
    self.dropout = Dropout(c.dropout if dropout is None else dropout, rngs=rngs)
    self.classifier = nnx.Linear(c.hidden_size, num_labels,
                                 kernel_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    """-> logits [batch, seq, num_labels]."""
    batch, seq = jnp.shape(input_ids)
    h = self.bert.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return self.classifier(self.dropout(h, deterministic=deterministic)).reshape(batch, seq, -1)

  def loss(self, batch, deterministic=None):
    """batch["labels"]: [batch, seq], IGNORE_INDEX where a position has no tag (special tokens,
    padding, a word's later sub-tokens)."""
    logits = self(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                  deterministic=deterministic)
    logits, labels = logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
    return losses.cross_entropy(logits, labels), dict(accuracy=_accuracy(logits, labels))


class BertForQuestionAnswering(nnx.Module):
  """Extractive QA: a start and an end logit per token (Hugging Face's `qa_outputs`)."""

  def __init__(self, bert: BertModel, *, rngs: nnx.Rngs):
    c = bert.config
    self.bert = bert
    self.qa_outputs = nnx.Linear(c.hidden_size, 2,
                                 kernel_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=None):
    """-> (start logits, end logits), each [batch, seq]; padding gets -inf-like logits."""
    batch, seq = jnp.shape(input_ids)
    h = self.bert.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    logits = self.qa_outputs(h).reshape(batch, seq, 2)
    if attention_mask is not None:
      logits = jnp.where(jnp.asarray(attention_mask)[..., None] > 0, logits, -1e9)
    return logits[..., 0], logits[..., 1]

  def loss(self, batch, deterministic=None):
    """batch["start_positions"], batch["end_positions"]: [batch] token indices (0, the [CLS]
    token, when the answer is not in the window). Loss: mean of the start and end losses."""
    start, end = self(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                      deterministic=deterministic)
    s, e = batch["start_positions"], batch["end_positions"]
    loss = (losses.cross_entropy(start, s) + losses.cross_entropy(end, e)) / 2
    both = (jnp.argmax(start, -1) == s) & (jnp.argmax(end, -1) == e)
    return loss, dict(span_accuracy=both.mean())


def flops_per_token(c: BertConfig, seq: int) -> float:
  """Training FLOPs per token of the encoder (6 x the matmul parameters, plus attention scores
  and values, forward and backward); embeddings are lookups and not counted."""
  per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
  return 6 * c.num_layers * per_layer + 12 * c.num_layers * c.hidden_size * seq

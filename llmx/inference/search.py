"""Greedy and beam-search decoding for encoder-decoder models, batched, with a key/value cache.

The source batch is encoded once; the decoder then adds one token per row per step inside a
`jax.lax.while_loop` (one compiled program), reading the self-attention cache of the tokens
before it and the cross-attention keys/values of the encoder output, both computed once.
`use_cache=False` re-runs the whole decoder over the prefix at every step instead: slower, the
reference the cache is tested against.

Beam search keeps, per source row, `beam_size` alive hypotheses and `beam_size` finished ones.
At each step the 2 * beam_size best extensions of the alive beams are scored; those ending in
</s> become finished candidates, scored by log-probability / length penalty, the GNMT form
((5 + length) / 6) ** alpha (length counts the generated tokens, </s> included; alpha 0: raw
log-probability) if they rank among the beam_size best extensions; the best non-</s> extensions
stay alive. A row is done when it has
beam_size finished hypotheses and its best alive one could not beat the worst of them even at
the longest length. Finished hypotheses keep their </s>; a hypothesis still alive at
max_new_tokens is returned without one (scored the same way). With beam_size 1 and
length_penalty 0 this is exactly greedy decoding (with a length penalty, beam 1 may go on past
a greedy </s> when a longer hypothesis could still score better).

The model needs `encode(src) -> (memory, src_valid)`, `init_cache(memory, src_valid,
max_len)`, `decode_step(tokens, positions, cache) -> (logits, cache)`, and for the uncached path
`decode(tgt_in, memory, src_valid)` and `logits(h)`; `config.max_len` and `config.pad_id`
(llmx.families.seq2seq.model.Transformer has them).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.errors import LlmxError


class DecodingError(LlmxError, ValueError):
  """Bad decoding input (an empty or too long source, bad options)."""


@dataclasses.dataclass
class Decoded:
  tokens: list        # per source row: the best hypothesis, int32 ids after <s> (</s> kept if reached)
  scores: np.ndarray  # [rows]: its score (length-normalised log-probability)
  beams: list         # per row: every hypothesis, best first
  beam_scores: np.ndarray  # [rows, beam_size], sorted descending
  truncated: int      # sources cut to the model's max_len (truncate=True)


def source_batch(sources, *, max_len: int, pad_id: int, eos_id: int | None = None,
                 truncate: bool = False, multiple: int = 8):
  """Token-id sources (each ending in </s>) -> (int32 [rows, S] right-padded with pad_id,
  number truncated). S is the longest source rounded up to `multiple` (fewer compilations).

  An empty source raises DecodingError. A source longer than max_len raises DecodingError,
  unless truncate=True: then its first max_len - 1 tokens are kept, followed by </s> (eos_id).
  """
  if len(sources) == 0:
    raise DecodingError("no sources to decode")
  rows, truncated = [], 0
  for i, s in enumerate(sources):
    s = np.asarray(s)
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
      raise DecodingError(f"source {i}: need a 1-D array of token ids, got shape {s.shape} "
                          f"dtype {s.dtype}")
    if s.size == 0 or (eos_id is not None and s.size == 1 and s[0] == eos_id):
      raise DecodingError(f"source {i} is empty: give at least one token")
    if s.size > max_len:
      if not truncate:
        raise DecodingError(f"source {i} has {s.size} tokens, more than the model's max_len="
                            f"{max_len}: shorten it (or truncate=True keeps its first "
                            f"{max_len} tokens)")
      s = s[:max_len]
      if eos_id is not None:
        s = np.concatenate([s[:-1], [eos_id]])
      truncated += 1
    rows.append(s)
  width = min(-(-max(r.size for r in rows) // multiple) * multiple, max_len)
  batch = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    batch[i, :r.size] = r
  return batch, truncated


def greedy(model: nnx.Module, sources, *, bos_id: int, eos_id: int,
           max_new_tokens: int | None = None, use_cache: bool = True,
           truncate: bool = False) -> Decoded:
  """The most likely next token at each step, for token-id sources (lists or arrays, each
  ending in </s>; see `source_batch` for empty and too long ones). Scores: summed log-probs.

  max_new_tokens: longest output (</s> included); default min(max_len - 1, 2 * S + 10) for
  sources padded to S tokens.
  """
  src, truncated, options = _prepare(model, sources, eos_id, max_new_tokens, truncate)
  graphdef, state = nnx.split(model)
  tokens, scores = _greedy(graphdef, state, jnp.asarray(src), bos_id=int(bos_id),
                           use_cache=bool(use_cache), **options)
  return _decoded(np.asarray(tokens)[:, None], np.asarray(scores)[:, None], eos_id, truncated)


def beam_search(model: nnx.Module, sources, *, bos_id: int, eos_id: int, beam_size: int = 4,
                length_penalty: float = 0.6, max_new_tokens: int | None = None,
                use_cache: bool = True, truncate: bool = False) -> Decoded:
  """Beam search (module docstring) for token-id sources, as `greedy` takes them."""
  if not isinstance(beam_size, int) or beam_size < 1:
    raise DecodingError(f"beam_size={beam_size!r}: must be an integer >= 1")
  if not length_penalty >= 0:
    raise DecodingError(f"length_penalty={length_penalty}: must be >= 0")
  if 2 * beam_size > model.config.vocab_size:
    raise DecodingError(f"beam_size={beam_size}: must be at most half the vocabulary "
                        f"({model.config.vocab_size})")
  src, truncated, options = _prepare(model, sources, eos_id, max_new_tokens, truncate)
  graphdef, state = nnx.split(model)
  tokens, scores = _beam_search(graphdef, state, jnp.asarray(src), beam_size=beam_size,
                                alpha=float(length_penalty), bos_id=int(bos_id),
                                use_cache=bool(use_cache), **options)
  return _decoded(np.asarray(tokens), np.asarray(scores), eos_id, truncated)


def _prepare(model, sources, eos_id, max_new_tokens, truncate):
  c = model.config
  src, truncated = source_batch(sources, max_len=c.max_len, pad_id=c.pad_id, eos_id=eos_id,
                                truncate=truncate)
  limit = c.max_len - 1
  if max_new_tokens is None:
    max_new_tokens = min(limit, 2 * src.shape[1] + 10)
  if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
    raise DecodingError(f"max_new_tokens={max_new_tokens!r}: must be an integer in [1, {limit}] "
                        f"(the model's max_len - 1)")
  return src, truncated, dict(eos_id=int(eos_id), max_new=max_new_tokens)


def _decoded(tokens, scores, eos_id, truncated) -> Decoded:
  beams = [[_strip(row, eos_id) for row in row_beams] for row_beams in tokens]
  return Decoded(tokens=[b[0] for b in beams], scores=scores[:, 0], beams=beams,
                 beam_scores=scores, truncated=truncated)


def _strip(row, eos_id: int) -> np.ndarray:
  """[max_new + 1] with <s> first -> the generated ids, up to and including the first </s>."""
  row = row[1:]
  ends = np.flatnonzero(row == eos_id)
  return row[:ends[0] + 1] if ends.size else row


def _stepper(model, src, *, n_rows: int, max_new: int, use_cache: bool):
  """-> (state, step(tokens [n, max_new + 1], t, state) -> (log-probs [n, V] of the token after
  position t, state), reorder(state, rows) -> state with its rows gathered)."""
  memory, src_valid = model.encode(src, deterministic=True)
  b, s = src.shape
  repeat = n_rows // b
  memory = jnp.repeat(memory.reshape(b, s, -1), repeat, axis=0).reshape(n_rows * s, -1)
  src_valid = jnp.repeat(src_valid, repeat, axis=0)

  if use_cache:
    cache = model.init_cache(memory, src_valid, max_new)

    def step(tokens, t, cache):
      token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
      logits, cache = model.decode_step(token, jnp.full((n_rows, 1), t, jnp.int32), cache)
      return jax.nn.log_softmax(logits[:, 0], axis=-1), cache

    def reorder(cache, rows):
      # Cross-attention keys/values are the same for every beam of a source row: kept as they are.
      return dict(cache, self_kv=jax.tree.map(lambda x: x[rows], cache["self_kv"]))
    return cache, step, reorder

  def step(tokens, t, state):
    # The whole prefix again; causal attention keeps the zeros after position t out of row t.
    h = model.decode(tokens[:, :max_new], memory, src_valid, deterministic=True)
    h = jax.lax.dynamic_index_in_dim(h.reshape(n_rows, max_new, -1), t, axis=1, keepdims=False)
    return jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1), state
  return (), step, lambda state, rows: state


@functools.partial(jax.jit, static_argnames=("graphdef", "bos_id", "eos_id", "max_new", "use_cache"))
def _greedy(graphdef, state, src, *, bos_id, eos_id, max_new, use_cache):
  """-> (tokens int32 [b, max_new + 1] (<s> first, </s> then padding 0), sum of log-probs [b])."""
  model = nnx.merge(graphdef, state)
  b = src.shape[0]
  dstate, step, _ = _stepper(model, src, n_rows=b, max_new=max_new, use_cache=use_cache)
  tokens = jnp.zeros((b, max_new + 1), jnp.int32).at[:, 0].set(bos_id)

  def body(carry):
    t, tokens, score, done, dstate = carry
    logp, dstate = step(tokens, t, dstate)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    score = score + jnp.where(done, 0.0, logp[jnp.arange(b), token])
    tokens = tokens.at[:, t + 1].set(jnp.where(done, 0, token))
    return t + 1, tokens, score, done | (token == eos_id), dstate

  def cond(carry):
    return (carry[0] < max_new) & ~jnp.all(carry[3])

  carry = (jnp.int32(0), tokens, jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool), dstate)
  _, tokens, score, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, score


def _length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "alpha", "bos_id", "eos_id",
                                             "max_new", "use_cache"))
def _beam_search(graphdef, state, src, *, beam_size, alpha, bos_id, eos_id, max_new, use_cache):
  """-> (tokens int32 [b, K, max_new + 1] (<s> first), scores float32 [b, K]), best first."""
  model = nnx.merge(graphdef, state)
  b, k = src.shape[0], beam_size
  n = b * k
  length = max_new + 1
  dstate, step, reorder = _stepper(model, src, n_rows=n, max_new=max_new, use_cache=use_cache)
  neg_inf = jnp.float32(-jnp.inf)
  seqs = jnp.zeros((b, k, length), jnp.int32).at[:, :, 0].set(bos_id)
  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  logp = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None], (b, 1))
  fin_seqs = seqs
  fin_scores = jnp.full((b, k), neg_inf)
  rows = jnp.arange(b)[:, None]

  def body(carry):
    t, seqs, logp, fin_seqs, fin_scores, dstate = carry
    token_logp, dstate = step(seqs.reshape(n, length), t, dstate)
    vocab = token_logp.shape[-1]
    cand = (logp[:, :, None] + token_logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    cand_logp, flat = jax.lax.top_k(cand, 2 * k)               # [b, 2k], best first
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_seqs = seqs[rows, beam].at[:, :, t + 1].set(token)     # [b, 2k, length]
    is_eos = token == eos_id
    # Finished: the old ones and this step's </s> candidates among the best k (fairseq's rule:
    # a </s> ranked below k alive extensions is not a hypothesis the beam would keep); the best
    # k stay.
    in_beam = jnp.arange(2 * k)[None] < k
    eos_scores = jnp.where(is_eos & in_beam, cand_logp / _length_penalty(t + 1.0, alpha), neg_inf)
    all_scores = jnp.concatenate([fin_scores, eos_scores], axis=1)
    fin_scores, pick = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)[rows, pick]
    # Alive: the best k candidates that did not end.
    logp, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp), k)
    seqs = cand_seqs[rows, pick]
    origin = (jnp.arange(b)[:, None] * k + beam[rows, pick]).reshape(n)
    return t + 1, seqs, logp, fin_seqs, fin_scores, reorder(dstate, origin)

  def cond(carry):
    t, _, logp, _, fin_scores, _ = carry
    # The best alive hypothesis, at the longest length (its log-probability can only fall).
    best_alive = logp[:, 0] / _length_penalty(float(max_new), alpha)
    done = (fin_scores[:, -1] > neg_inf) & (best_alive <= fin_scores[:, -1])
    return (t < max_new) & ~jnp.all(done)

  carry = (jnp.int32(0), seqs, logp, fin_seqs, fin_scores, dstate)
  t, seqs, logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, carry)
  # Rows short of k finished hypotheses take alive ones (without </s>), scored alike.
  alive_scores = logp / _length_penalty(t.astype(jnp.float32), alpha)
  all_scores = jnp.concatenate([fin_scores, alive_scores], axis=1)
  scores, pick = jax.lax.top_k(all_scores, k)
  return jnp.concatenate([fin_seqs, seqs], axis=1)[rows, pick], scores

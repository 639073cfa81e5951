"""The cache protocol every decoder model implements, and the two ways the decoding loops drive it.

A model is decodable by llmx.inference when it has:

  max_decode_len: int
      the positions a row can hold (GPT: block_size; the encoder-decoder Transformer: max_len).
  init_cache(batch, max_len, *inputs) -> cache
      the empty decoding state of `batch` rows of up to max_len positions. `inputs` condition the
      text: none for a decoder-only LM; the source int [sources, S] for an encoder-decoder, which
      encodes it here, once: its encoder output is part of the state. batch is then a multiple
      of sources and rows i*r..i*r+r-1 decode source i (its beams or samples).
  decode_step(tokens, positions, cache) -> (hidden [batch, T, d_model], cache)
      T new tokens per row (int [batch, T]) at their positions (int [batch, T]; rows may stand
      at different positions). Their keys/values go to the cache slots of their positions and
      each token attends to the slots up to its own position, so stale slots beyond never count:
      a prompt is one call at positions 0..T-1 (the prefill), a decoding step one token per row.
  logits(hidden [..., d_model]) -> [..., vocab]
  reorder_cache(cache, rows int [batch]) -> cache
      row i of the new cache is row rows[i] of the old one (beam search; a row only ever moves
      among the rows of its own source).
  __call__(*inputs, tokens, deterministic=True) -> logits [batch, T, vocab]
      the plain forward pass, inputs given per row: the uncached reference.

The loops (sampling.py, beam.py) see a model through a stepper: `Cached` (one prefill, then one
token per row per step against the cache) or `Uncached` (the whole text through the plain forward
pass for every token: slower, the reference the cache is tested against). Both hold each row's
text in a right-padded buffer tokens [n, W] with lengths [n]: the newest token of row r is
tokens[r, lengths[r] - 1], at position lengths[r] - 1.
"""
from typing import Protocol

import jax
import jax.numpy as jnp


class Decoder(Protocol):
  max_decode_len: int

  def init_cache(self, batch: int, max_len: int, *inputs): ...
  def decode_step(self, tokens, positions, cache): ...
  def logits(self, hidden): ...
  def reorder_cache(self, cache, rows): ...
  def __call__(self, *inputs_and_tokens, deterministic=None): ...


class Cached:
  """Drives a Decoder through its cache.

  cache_len: slots per row (at most max_decode_len). slide: rows may outgrow the context; a row
  that has filled every slot goes on from a re-read of its last max_decode_len // 2 tokens,
  positions restarting at 0 (every row is re-read then: one compiled program; the text past the
  context then differs from `Uncached`, which re-reads a full window for every token).
  """

  def __init__(self, model: Decoder, inputs: tuple, *, cache_len: int, slide: bool):
    self.model, self.inputs, self.cache_len, self.slide = model, inputs, cache_len, slide

  def _logits(self, hidden):
    return self.model.logits(hidden).astype(jnp.float32)

  def start(self, prompts, lengths):
    """prompts int [n, P] right-padded, lengths int [n] -> state: the cache holding every
    prompt token but each row's newest, which `advance` feeds."""
    n, p = prompts.shape
    cache = self.model.init_cache(n, self.cache_len, *self.inputs)
    if p > 1:  # a row shorter than P also writes padding past its end: masked, then overwritten
      _, cache = self.model.decode_step(prompts[:, :p - 1],
                                        jnp.broadcast_to(jnp.arange(p - 1), (n, p - 1)), cache)
    return cache, lengths - 1  # (cache, slots filled per row)

  def advance(self, state, tokens, lengths, active):
    """Feeds each row's newest token -> (logits float32 [n, vocab] of the token after it, state).
    active bool [n]: rows still decoding (the others may be fed anything)."""
    cache, filled = state
    rows = jnp.arange(tokens.shape[0])
    if self.slide:
      cache, filled = jax.lax.cond(jnp.any(active & (filled >= self.cache_len)), self._refill,
                                   lambda c, f, t, n: (c, f), cache, filled, tokens, lengths)
    position = jnp.minimum(filled, self.cache_len - 1)  # finished rows may sit at the end
    token = tokens[rows, lengths - 1]
    hidden, cache = self.model.decode_step(token[:, None], position[:, None], cache)
    return self._logits(hidden[:, 0]), (cache, filled + 1)

  def _refill(self, cache, filled, tokens, lengths):
    """Every row's last `keep` tokens before its newest, re-read at positions 0..keep-1."""
    n, width = tokens.shape
    keep = max(self.cache_len // 2, 1)
    before = jnp.minimum(lengths - 1, keep)
    index = jnp.clip((lengths - 1 - before)[:, None] + jnp.arange(keep), 0, width - 1)
    window = jnp.take_along_axis(tokens, index, axis=1)
    _, cache = self.model.decode_step(window, jnp.broadcast_to(jnp.arange(keep), (n, keep)),
                                      cache)
    return cache, before

  def reorder(self, state, rows):
    cache, filled = state
    return self.model.reorder_cache(cache, rows), filled[rows]


class Uncached:
  """Drives a Decoder through its plain forward pass: every token re-reads the last
  max_decode_len tokens of its row (positions from 0), nothing is kept between steps."""

  def __init__(self, model: Decoder, inputs: tuple, *, cache_len: int, slide: bool):
    del slide  # a window over the last tokens slides by construction
    self.model, self.inputs, self.window = model, inputs, cache_len

  def start(self, prompts, lengths):
    return ()

  def advance(self, state, tokens, lengths, active):
    n, width = tokens.shape
    start = jnp.maximum(lengths - self.window, 0)
    index = jnp.clip(start[:, None] + jnp.arange(self.window), 0, width - 1)
    window = jnp.take_along_axis(tokens, index, axis=1)
    # The inputs are per source; the rows of a source (beams, samples) are consecutive.
    inputs = tuple(jnp.repeat(x, n // x.shape[0], axis=0) for x in self.inputs)
    logits = self.model(*inputs, window, deterministic=True)
    # Causal attention: whatever follows the newest token does not reach its logits.
    return logits[jnp.arange(n), lengths - 1 - start].astype(jnp.float32), state

  def reorder(self, state, rows):
    return state

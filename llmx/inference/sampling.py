"""Sampling and greedy decoding: the logits processors and the loop that adds one token per row.

Each step turns the logits of a row's next token into a choice, in this order (Hugging Face's):
the repetition penalty (CTRL: a logit of a token already in the row, prompt included, is divided
by the penalty when positive, multiplied when negative), then greedy argmax, or else the
temperature, top-k (exactly the k largest logits), top-p (the smallest most-likely-first set
holding top_p of the probability) and min-p (tokens at least min_p times as likely as the most
likely one), and a draw. The most likely token survives every filter.

`sample_loop` runs inside `jax.lax.while_loop`: a row ends at a stop token (kept) or at its
length limit; the loop ends when every row has.
"""
import jax
import jax.numpy as jnp
import numpy as np


def penalize_repeats(logits, seen, penalty):
  """logits float [n, vocab], seen bool [n, vocab], penalty > 0 (1: off) -> logits."""
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)


def filter_logits(logits, *, top_k: int | None = None, top_p=None, min_p=None):
  """logits [n, vocab] -> the same with -inf outside the allowed tokens.

  top_k: exactly the k largest logits of each row stay (ties go to the lower token id).
  top_p (nucleus): of the tokens left, the smallest most-likely-first set whose probability
  reaches top_p stays. min_p: tokens with probability >= min_p * the largest stay (0: all).
  """
  rows = jnp.arange(logits.shape[0])[:, None]
  if top_k:
    _, top = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
    keep = jnp.zeros(logits.shape, bool).at[rows, top].set(True)
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(mass_before < top_p)
    logits = jnp.where(keep, logits, -jnp.inf)
  if min_p is not None:
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)
    logits = jnp.where(logits >= floor, logits, -jnp.inf)
  return logits


def sample_logits(key, logits, *, temperature, top_k: int | None = None, top_p=None, min_p=None,
                  greedy: bool | None = None):
  """logits [n, vocab] -> token ids int32 [n]. Greedy (argmax) when temperature is 0; `greedy`
  says so statically when temperature is a traced value."""
  greedy = (temperature == 0) if greedy is None else greedy
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Stream:
  """Where a streaming decode sends each step's tokens as they are chosen: the compiled loop calls
  `emit` (a jax.debug.callback, ordered), which hands the host `sink(tokens int [n], active bool
  [n])`. One program serves every sink: the sink is set on this object around a run, not traced."""

  def __init__(self):
    self.sink = None

  def emit(self, tokens, active):
    if self.sink is not None:
      self.sink(np.asarray(tokens), np.asarray(active))


STREAM = Stream()


def sample_loop(stepper, prompts, lengths, limits, key, temperature, top_p, min_p, penalty, *,
                max_new: int, greedy: bool, top_k: int | None, top_p_on: bool,
                stop_tokens: tuple, stream: bool = False):
  """prompts int [n, P] right-padded, lengths / limits int [n] (a row's prompt length and its
  most tokens in all), key, and the traced float32 temperature, top_p, min_p (0: off) and
  repetition penalty (1: off) -> (tokens int32 [n, P + max_new], lengths [n], scores [n]: the
  summed log-probabilities of each row's new tokens under the model, before any processing)."""
  n, p = prompts.shape
  rows = jnp.arange(n)
  width = p + max_new
  tokens = jnp.zeros((n, width), jnp.int32).at[:, :p].set(prompts)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  def body(carry):
    i, tokens, lengths, scores, done, key, state = carry
    logits, state = stepper.advance(state, tokens, lengths, ~done)
    in_row = jnp.arange(width)[None] < lengths[:, None]
    seen = jnp.zeros(logits.shape, bool).at[rows[:, None], tokens].max(in_row)
    key, sub = jax.random.split(key)
    token = sample_logits(sub, penalize_repeats(logits, seen, penalty), temperature=temperature,
                          top_k=top_k, top_p=top_p if top_p_on else None, min_p=min_p,
                          greedy=greedy)
    if stream:  # the host sees each token as soon as it is chosen (chat streams them)
      jax.debug.callback(STREAM.emit, token, ~done, ordered=True)
    scores = scores + jnp.where(done, 0.0, jax.nn.log_softmax(logits, axis=-1)[rows, token])
    slot = jnp.minimum(lengths, width - 1)
    tokens = tokens.at[rows, slot].set(jnp.where(done, tokens[rows, slot], token))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.any(token[:, None] == stops[None], axis=1) | (lengths >= limits)
    return i + 1, tokens, lengths, scores, done, key, state

  def cond(carry):
    i, done = carry[0], carry[4]
    return (i < max_new) & ~jnp.all(done)

  carry = (jnp.int32(0), tokens, lengths, jnp.zeros((n,), jnp.float32), lengths >= limits, key,
           stepper.start(prompts, lengths))
  _, tokens, lengths, scores, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, lengths, scores

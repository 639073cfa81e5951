"""Beam search for any decoder of the cache protocol, batched prompts of different lengths.

Each prompt (a source row) keeps `k` alive hypotheses and `k` finished ones. A step scores the
2k best one-token extensions of its alive beams. Those ending the hypothesis (a stop token, or
the row's length limit) become finished candidates if they rank among the k best extensions
(fairseq's rule: a stop ranked below k alive extensions is not a hypothesis the beam would
keep), scored by log-probability / length penalty, the GNMT form ((5 + length) / 6) ** alpha
(length counts the new tokens, a stop included; alpha 0: the raw log-probability); the best k
finished stay. The best k extensions that did not end stay alive.

A row is done when it has k finished hypotheses and, with early_stopping, at once; without, when
its best alive hypothesis could not beat the worst finished one even at its longest length (its
log-probability can only fall). The loop ends when every row is done; each row's cache rows
follow their beams (`reorder`). Finished hypotheses keep their stop token; one cut at the
length limit has none.
"""
import jax
import jax.numpy as jnp


def length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def beam_loop(stepper, prompts, lengths, new_limits, *, beam_size: int, alpha: float,
              early_stopping: bool, max_new: int, stop_tokens: tuple):
  """prompts int [b, P] right-padded, lengths int [b], new_limits int [b] (new tokens allowed
  per row, 0..max_new) -> (tokens int32 [b, k, P + max_new] (prompt first), new-token counts
  int32 [b, k], scores float32 [b, k]), best first."""
  b, p = prompts.shape
  k = beam_size
  n = b * k
  width = p + max_new
  rows = jnp.arange(b)[:, None]
  neg_inf = jnp.float32(-jnp.inf)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  # The prompt is read once per row, then its cache is copied to the row's k beams.
  state = stepper.reorder(stepper.start(prompts, lengths), jnp.repeat(jnp.arange(b), k))
  seqs = jnp.zeros((b, k, width), jnp.int32).at[:, :, :p].set(prompts[:, None])
  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  logp = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None], (b, 1))
  # A row allowed no new token is finished as its prompt alone.
  fin_scores = jnp.where((new_limits[:, None] == 0) & (jnp.arange(k) == 0), 0.0, neg_inf)
  fin_seqs, fin_new = seqs, jnp.zeros((b, k), jnp.int32)

  def body(carry):
    t, seqs, logp, fin_seqs, fin_new, fin_scores, done, state = carry
    logits, state = stepper.advance(state, seqs.reshape(n, width), jnp.repeat(lengths + t, k),
                                    jnp.repeat(~done, k))
    vocab = logits.shape[-1]
    token_logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
    cand = (logp[:, :, None] + token_logp).reshape(b, k * vocab)
    cand_logp, flat = jax.lax.top_k(cand, 2 * k)                     # [b, 2k], best first
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_seqs = seqs[rows, beam].at[rows, jnp.arange(2 * k)[None], (lengths + t)[:, None]].set(
        token)                                                          # [b, 2k, width]
    ends = jnp.any(token[..., None] == stops, axis=-1) | (t + 1 >= new_limits)[:, None]
    # Finished: the old ones and this step's ending candidates among the best k.
    in_beam = jnp.arange(2 * k)[None] < k
    end_scores = jnp.where(ends & in_beam, cand_logp / length_penalty(t + 1.0, alpha), neg_inf)
    new_scores, pick = jax.lax.top_k(jnp.concatenate([fin_scores, end_scores], axis=1), k)
    new_fin = jnp.concatenate([fin_seqs, cand_seqs], axis=1)[rows, pick]
    new_count = jnp.concatenate([fin_new, jnp.full((b, 2 * k), t + 1)], axis=1)[rows, pick]
    keep = done[:, None]  # a finished row's hypotheses are final (early_stopping stops early)
    fin_scores = jnp.where(keep, fin_scores, new_scores)
    fin_seqs = jnp.where(keep[..., None], fin_seqs, new_fin)
    fin_new = jnp.where(keep, fin_new, new_count)
    # Alive: the best k candidates that did not end.
    logp, pick = jax.lax.top_k(jnp.where(ends, neg_inf, cand_logp), k)
    seqs = cand_seqs[rows, pick]
    state = stepper.reorder(state, (rows * k + beam[rows, pick]).reshape(n))
    full = fin_scores[:, -1] > neg_inf
    if early_stopping:
      done = done | full
    else:
      best_alive = logp[:, 0] / length_penalty(new_limits.astype(jnp.float32), alpha)
      done = done | (full & (best_alive <= fin_scores[:, -1]))
    done = done | (logp[:, 0] == neg_inf)  # nothing alive: every extension ended
    return t + 1, seqs, logp, fin_seqs, fin_new, fin_scores, done, state

  def cond(carry):
    t, done = carry[0], carry[6]
    return (t < max_new) & ~jnp.all(done)

  carry = (jnp.int32(0), seqs, logp, fin_seqs, fin_new, fin_scores, new_limits == 0, state)
  _, _, _, fin_seqs, fin_new, fin_scores, _, _ = jax.lax.while_loop(cond, body, carry)
  return fin_seqs, fin_new, fin_scores

"""llmx.inference for every decoder: cached decoding equals uncached token for token (decoder LM,
encoder-decoder, and a Markov chain behind the cache protocol), sampling filters, repetition
penalty, stop tokens, beam search's length penalty and early stopping, errors, flags."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from llmx import inference
from llmx.families.lm.model import GPT, GPTConfig
from llmx.families.seq2seq.model import Transformer, TransformerConfig
from llmx.inference import cli
from llmx.inference.prompts import pad_sources
from llmx.inference.sampling import filter_logits, sample_logits

VOCAB, BOS, EOS = 41, 1, 2


def assert_same_rows(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def prompts(*lengths, seed=0, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


# ---------------------------------------------------------------- a Markov chain as a decoder
class Markov(nnx.Module):
  """logits = a[token] + b[previous token] (b[V] before the first): a second-order chain behind
  the cache protocol. Its cache holds each slot's token, so the loops' bookkeeping (prefill,
  positions, refill past the context, beam reordering) decides what it reads; its text depends
  on two tokens only, so cached and uncached decoding agree exactly, even past the context."""

  def __init__(self, a, b, context: int):
    self.vocab, self.max_decode_len = a.shape[0], context
    self.w = nnx.Param(jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], 0))  # [2V + 1, V]

  def init_cache(self, batch, max_len):
    return jnp.zeros((batch, max_len), jnp.int32)

  def _hidden(self, tokens, previous):
    return jnp.concatenate([jax.nn.one_hot(tokens, self.vocab),
                            jax.nn.one_hot(previous, self.vocab + 1)], -1)

  def decode_step(self, tokens, positions, cache):
    rows = jnp.arange(tokens.shape[0])[:, None]
    cache = cache.at[rows, positions].set(tokens)
    previous = jnp.where(positions > 0, cache[rows, jnp.maximum(positions - 1, 0)], self.vocab)
    return self._hidden(tokens, previous), cache

  def logits(self, hidden):
    return hidden @ self.w[...]

  def reorder_cache(self, cache, rows):
    return cache[rows]

  def __call__(self, tokens, deterministic=None):
    previous = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=self.vocab)
    return self.logits(self._hidden(tokens, previous))


def random_markov(vocab=13, context=8, seed=0):
  rng = np.random.default_rng(seed)
  return Markov(rng.normal(size=(vocab, vocab)).astype(np.float32) * 3,
                rng.normal(size=(vocab + 1, vocab)).astype(np.float32), context)


def test_markov_cached_equals_uncached_past_the_context():
  """Prompts of 1..7 tokens, 14 new ones in an 8-token context: every row re-reads its last 4
  tokens at least once; greedy, seeded sampling and beam search match the uncached loop."""
  model = random_markov()
  batch = prompts(5, 1, 7, 2, vocab=13, seed=3)
  for options in (dict(temperature=0), dict(temperature=1.3, top_k=8, min_p=0.02, seed=4),
                  dict(beam_size=3, length_penalty=0.6, stop_tokens=[5])):
    cached = inference.decode(model, batch, max_new_tokens=14, **options)
    uncached = inference.decode(model, batch, max_new_tokens=14, use_cache=False, **options)
    assert_same_rows(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.scores, uncached.scores)
    for row, p in zip(cached.tokens, batch):
      np.testing.assert_array_equal(row[:len(p)], p)
    if "stop_tokens" not in options:
      assert [len(r) for r in cached.tokens] == [len(p) + 14 for p in batch]
    if "seed" in options:  # a traced value: no new compilation
      again = inference.decode(model, batch, max_new_tokens=14, **options)
      other = inference.decode(model, batch, max_new_tokens=14, **dict(options, seed=5))
      assert_same_rows(again.tokens, cached.tokens)
      assert other.compile_s < 0.5 and any(
          not np.array_equal(a, b) for a, b in zip(other.tokens, cached.tokens))


def test_stop_tokens_and_length_limits():
  model = random_markov(seed=1)
  batch = prompts(4, 6, 3, vocab=13, seed=1)
  free = inference.generate(model, batch, max_new_tokens=12, temperature=0)
  stop = int(free[0][4 + 2])  # the 3rd new token of row 0
  rows = inference.generate(model, batch, max_new_tokens=12, temperature=0, stop_tokens=[stop])
  for full, row, n in zip(free, rows, (4, 6, 3)):
    new = list(full[n:])
    end = new.index(stop) + 1 if stop in new else len(new)
    np.testing.assert_array_equal(row, full[:n + end])  # the stop token is kept
  assert rows[0][-1] == stop and len(rows[0]) <= 4 + 3
  capped = inference.generate(model, batch, max_new_tokens=12, temperature=0, max_length=9)
  assert [len(r) for r in capped] == [9, 9, 9]
  np.testing.assert_array_equal(capped[1], free[1][:9])
  beams = inference.decode(model, batch, max_new_tokens=12, beam_size=2, max_length=9)
  assert all(len(h) == 9 for row in beams.beams for h in row)


def test_repetition_penalty_matches_a_reference():
  """Greedy with the CTRL penalty against a numpy loop; and it changes the text."""
  model = random_markov(seed=2)
  w = np.asarray(model.w[...])
  batch = prompts(3, 5, vocab=13, seed=2)
  penalty = 1.8
  got = inference.generate(model, batch, max_new_tokens=10, temperature=0,
                           repetition_penalty=penalty)
  for prompt, row in zip(batch, got):
    text = list(prompt)
    for _ in range(10):
      previous = text[-2] if len(text) > 1 else 13
      logits = w[text[-1]] + w[13 + previous]
      seen = np.zeros(13, bool)
      seen[text] = True
      logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
      text.append(int(np.argmax(logits)))
    np.testing.assert_array_equal(row, text)
  plain = inference.generate(model, batch, max_new_tokens=10, temperature=0)
  assert any(not np.array_equal(a, b) for a, b in zip(got, plain))
  single = inference.generate(model, batch[0], max_new_tokens=10)  # one prompt: one array
  assert isinstance(single, np.ndarray) and single.shape == (13,)


def test_min_p_draws_exactly_the_allowed_tokens():
  probs = np.array([0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01,
                    0.005], np.float32)
  a = np.tile(np.log(probs), (13, 1))
  model = Markov(a, np.zeros((14, 13), np.float32), context=8)
  batch = [np.array([0], np.int32)] * 400
  drawn = lambda **kw: {int(r[1]) for r in inference.generate(
      model, batch, max_new_tokens=1, temperature=1.0, seed=0, **kw)}
  assert drawn(min_p=0.2) == {0, 1, 2, 3, 4}  # p >= 0.2 * 0.3
  assert drawn(min_p=0.0) > {0, 1, 2, 3, 4, 5, 6}  # off: the tail comes up too


def chain(probs: dict, vocab=8):
  """A first-order chain from {token: {next: probability}}; the rest of each row's mass is
  spread over the other tokens."""
  a = np.zeros((vocab, vocab), np.float32)
  for token in range(vocab):
    row = probs.get(token, {})
    rest = (1 - sum(row.values())) / (vocab - len(row))
    a[token] = np.log([row.get(v, rest) for v in range(vocab)])
  return Markov(a, np.zeros((vocab + 1, vocab), np.float32), context=16)


def test_beam_length_penalty_and_early_stopping():
  """From S: </s> 0.4, a 0.35, c 0.2; a -> b -> </s> (0.99 each); c -> </s> 0.9. Raw
  log-probability prefers [</s>]; alpha 1 prefers [a b </s>], found only by going on past the
  two finished hypotheses [</s>] and [c </s>] of step 2, which early stopping does not (while
  the row of prompt D, which never ends, keeps the loop going)."""
  S, A, B, C, D = 0, 3, 4, 5, 6
  model = chain({S: {EOS: 0.4, A: 0.35, C: 0.2}, A: {B: 0.99}, B: {EOS: 0.99}, C: {EOS: 0.9},
                 D: {D: 0.99}})
  common = dict(beam_size=2, max_new_tokens=5, stop_tokens=[EOS])
  best = lambda **kw: list(inference.decode(model, [[S], [D]], **common, **kw).tokens[0])
  assert best(length_penalty=0.0) == [S, EOS]
  assert best(length_penalty=1.0) == [S, A, B, EOS]
  assert best(length_penalty=1.0, early_stopping=True) == [S, EOS]
  out = inference.decode(model, [[S], [D]], length_penalty=1.0, **common)
  assert list(out.tokens[1]) == [D] * 6
  np.testing.assert_allclose(out.beam_scores[0],
                             [np.log(0.35 * 0.99 * 0.99) / (8 / 6), np.log(0.4)], rtol=1e-5)


# ---------------------------------------------------------------- the decoder LM
def lm_of(**kw):
  cfg = dict(vocab_size=VOCAB, block_size=23, n_layer=2, n_head=4, d_model=24)
  cfg.update(kw)
  model = GPT(GPTConfig(**cfg), rngs=nnx.Rngs(params=5, dropout=1))
  # Larger weights than the 0.02 init: peaked, far-from-tied logits, so greedy decoding is a
  # real check (a near-uniform model could pick a different argmax from rounding alone).
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params))
  model.eval()
  return model


LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False, logits_soft_cap=20.0, attn_logits_soft_cap=30.0)
SAMPLING = dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=3)


@pytest.fixture(scope="module")
def gpt2():
  return lm_of()


BATCH = prompts(3, 9, 1, 14)  # 14 + 9 new tokens = block_size


@pytest.fixture(scope="module")
def gpt2_greedy_uncached(gpt2):
  return inference.generate(gpt2, BATCH, max_new_tokens=9, use_cache=False)


@pytest.mark.parametrize("variant, options", [
    ("gpt2", dict(temperature=0)), ("gpt2", SAMPLING), ("gpt2", dict(beam_size=3)),
    ("llama", dict(temperature=0))])
def test_lm_cached_equals_uncached(gpt2, gpt2_greedy_uncached, variant, options):
  """Prompts of 3, 9, 1 and 14 tokens in one batch, 9 new ones each."""
  model = gpt2 if variant == "gpt2" else lm_of(n_layer=1, **LLAMA)
  cached = inference.decode(model, BATCH, max_new_tokens=9, **options)
  if variant == "gpt2" and options == dict(temperature=0):
    assert_same_rows(cached.tokens, gpt2_greedy_uncached)
    return
  uncached = inference.decode(model, BATCH, max_new_tokens=9, use_cache=False, **options)
  assert_same_rows(cached.tokens, uncached.tokens)
  np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-5)
  assert [len(r) for r in cached.tokens] == [12, 18, 10, 23]
  if "beam_size" in options:
    for row, row_uncached in zip(cached.beams, uncached.beams):
      assert_same_rows(row, row_uncached)
    assert np.all(np.diff(cached.beam_scores, axis=1) <= 0)


def test_lm_past_the_context_keeps_going(gpt2, gpt2_greedy_uncached):
  """40 new tokens per prompt in a 23-token context: when the longest row fills the context
  (after 9 new tokens) every row goes on from a re-read of its recent tokens; until then the
  tokens are the uncached ones."""
  out = inference.generate(gpt2, BATCH, max_new_tokens=40)
  assert [len(r) for r in out] == [len(p) + 40 for p in BATCH]
  for row, inside in zip(out, gpt2_greedy_uncached):
    np.testing.assert_array_equal(row[:len(inside)], inside)
    assert row.min() >= 0 and row.max() < VOCAB
  again = inference.decode(gpt2, BATCH, max_new_tokens=40)  # compiled above
  assert again.new_tokens == 160 and again.tokens_per_s > 0 and again.compile_s < 0.5


# ---------------------------------------------------------------- the encoder-decoder
def tiny_seq2seq(*, vocab=29, seed=0, peaky=3.0, **overrides):
  fields = dict(vocab_size=vocab, max_len=24, d_model=32, n_head=4, n_encoder_layers=2,
                n_decoder_layers=2, mlp_hidden=48, dropout=0.0)
  fields.update(overrides)
  model = Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(seed))
  model.tgt_embed.embedding[...] = model.tgt_embed.embedding[...] * peaky
  model.eval()
  return model


@pytest.fixture(scope="module")
def copy_model():
  """A tiny model trained for a few seconds to copy its source: its hypotheses end in </s>
  after various lengths, as a translation model's do (a random model's rarely emit </s>)."""
  import optax
  model = tiny_seq2seq(vocab=16, seed=8, peaky=1.0, n_encoder_layers=1, n_decoder_layers=1)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  rng = np.random.default_rng(9)

  @jax.jit
  def step(params, opt_state, src, tgt_in, tgt_out):
    grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest).loss(src, tgt_in, tgt_out))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(150):
    src = np.zeros((32, 12), np.int32)
    tgt_in = np.zeros((32, 12), np.int32)
    tgt_out = np.full((32, 12), -100, np.int32)
    for r in range(32):
      words = rng.integers(4, 16, size=rng.integers(1, 9))
      src[r, :len(words) + 1] = np.append(words, EOS)
      tgt_in[r, :len(words) + 1] = np.append(BOS, words)
      tgt_out[r, :len(words) + 1] = np.append(words, EOS)
    params, opt_state = step(params, opt_state, src, tgt_in, tgt_out)
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return model


def random_sources(rng, lengths, vocab):
  return [np.concatenate([rng.integers(4, vocab, size=n), [EOS]]).astype(np.int32)
          for n in lengths]


SOURCES = random_sources(np.random.default_rng(3), [2, 5, 9, 4, 13, 1, 7], 16)


@pytest.fixture(scope="module")
def seq2seq_beams(copy_model):
  common = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=12, beam_size=3, length_penalty=0.6)
  return (inference.decode_sources(copy_model, SOURCES, **common),
          inference.decode_sources(copy_model, SOURCES, use_cache=False, **common))


def test_seq2seq_cached_equals_uncached_greedy_and_beam(copy_model, seq2seq_beams):
  common = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=12, temperature=0)
  greedy = inference.decode_sources(copy_model, SOURCES, **common)
  assert_same_rows(greedy.tokens,
                   inference.decode_sources(copy_model, SOURCES, use_cache=False, **common).tokens)
  ends = [t[-1] == EOS for t in greedy.continuations]
  assert any(ends) and len({len(t) for t in greedy.tokens}) > 1
  beam, beam_uncached = seq2seq_beams
  for row, row_uncached in zip(beam.beams, beam_uncached.beams):
    assert_same_rows(row, row_uncached)
  np.testing.assert_allclose(beam.beam_scores, beam_uncached.beam_scores, rtol=1e-5)


def test_seq2seq_cached_equals_uncached_top_p_sampling_from_prefixes(copy_model):
  """Forced target prefixes of 1, 3 and 2 tokens, one per source, sampled at top-p 0.9."""
  src, _ = pad_sources(SOURCES[:3], max_len=24, pad_id=0)
  starts = [[BOS], [BOS, *SOURCES[1][:2]], [BOS, SOURCES[2][0]]]
  options = dict(inputs=(src,), max_new_tokens=12, temperature=1.5, top_p=0.9, seed=0,
                 stop_tokens=[EOS])
  cached = inference.decode(copy_model, starts, **options)
  assert_same_rows(cached.tokens,
                   inference.decode(copy_model, starts, use_cache=False, **options).tokens)
  for row, start in zip(cached.tokens, starts):
    np.testing.assert_array_equal(row[:len(start)], start)
  other_seeds = {tuple(inference.decode(copy_model, starts, **dict(options, seed=s)).tokens[0])
                 for s in (1, 2, 3)}
  assert len(other_seeds | {tuple(cached.tokens[0])}) > 1  # it does sample


def teacher_forced_logprobs(model, source, hypotheses, width=12):
  """Sum of log p(token) of each hypothesis (ids after <s>) given the source, in one pass."""
  tgt = np.zeros((len(hypotheses), width + 1), np.int32)
  for i, h in enumerate(hypotheses):
    tgt[i, :len(h) + 1] = np.concatenate([[BOS], h])
  src, _ = pad_sources([source], max_len=24, pad_id=0)
  src = np.repeat(np.pad(src, ((0, 0), (0, 16 - src.shape[1]))), len(hypotheses), axis=0)
  logp = np.asarray(_log_probs(*nnx.split(model), jnp.asarray(src), jnp.asarray(tgt[:, :-1])))
  return [float(sum(logp[i, t, tgt[i, t + 1]] for t in range(len(h))))
          for i, h in enumerate(hypotheses)]


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(graphdef, state, src, tgt_in):
  return jax.nn.log_softmax(nnx.merge(graphdef, state)(src, tgt_in), axis=-1)


def test_seq2seq_beam_scores_are_normalised_log_probs(copy_model, seq2seq_beams):
  beam, _ = seq2seq_beams
  assert beam.beam_scores.shape == (len(SOURCES), 3)
  assert np.all(np.diff(beam.beam_scores, axis=1) <= 0)
  finished = 0
  for source, row, scores in zip(SOURCES, beam.beams, beam.beam_scores):
    row = [h[1:] for h in row]  # after <s>
    assert len({tuple(h) for h in row}) == 3                   # no hypothesis twice
    for h, score, logp in zip(row, scores, teacher_forced_logprobs(copy_model, source, row)):
      assert EOS not in h[:-1]
      finished += int(h[-1] == EOS)
      if h[-1] != EOS:
        assert len(h) == 12                                    # unfinished only at the limit
      np.testing.assert_allclose(score, logp / ((5 + len(h)) / 6) ** 0.6, rtol=1e-4, atol=1e-5)
  assert finished >= 12


def test_seq2seq_decode_step_matches_the_forward_pass():
  """A prefill of 3 target tokens, then 3 single steps, against the full pass's states
  (post-LN, learned positions, untied output: the other options run in the tests above)."""
  model = tiny_seq2seq(seed=10, peaky=1.0, norm="post", positions="learned",
                       share_embeddings=False, tie_output=False, n_encoder_layers=1,
                       n_decoder_layers=1)
  rng = np.random.default_rng(5)
  src, _ = pad_sources(random_sources(rng, [4, 9], 29), max_len=24, pad_id=0)
  tgt_in = jnp.asarray(rng.integers(4, 29, size=(2, 6)), jnp.int32).at[:, 0].set(BOS)

  @jax.jit  # one compilation for the lot
  def both(src, tgt_in):
    cache = model.init_cache(2, 6, src)
    hidden, cache = model.decode_step(tgt_in[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)),
                                      cache)
    steps = [hidden]
    for t in range(3, 6):
      hidden, cache = model.decode_step(tgt_in[:, t:t + 1], jnp.full((2, 1), t), cache)
      steps.append(hidden)
    return model.logits(jnp.concatenate(steps, axis=1)), model(src, tgt_in)

  cached, full = both(jnp.asarray(src), tgt_in)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- filters, errors, flags
def test_top_k_top_p_and_min_p_keep_exactly_the_allowed_tokens():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(5, 37)).astype(np.float32) * 2
  keep = lambda **kw: np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), **kw)))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  for k in (1, 4, 37):
    np.testing.assert_array_equal(keep(top_k=k), logits >= np.sort(logits, axis=1)[:, -k][:, None])
  for p in (0.05, 0.5, 0.9):
    kept = keep(top_p=p)
    for row in range(5):
      order = np.argsort(-probs[row])
      mass_before = np.cumsum(probs[row][order]) - probs[row][order]
      expected = set(order[mass_before < p])  # smallest set reaching p, top token always in
      assert set(np.flatnonzero(kept[row])) == expected
      assert probs[row][list(expected)].sum() >= p
  for m in (0.0, 0.1, 0.5, 1.0):
    np.testing.assert_array_equal(keep(min_p=jnp.float32(m)),
                                  probs >= m * probs.max(1, keepdims=True) * (1 - 1e-6))
  both = keep(top_k=6, top_p=0.5)
  assert both.sum(1).max() <= 6 and both.sum(1).min() >= 1


def test_sampling_draws_only_and_all_of_the_allowed_tokens():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 29)), jnp.float32)
  allowed = set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_k=5)))))
  draw = jax.jit(jax.vmap(lambda key: sample_logits(key, logits, temperature=1.5, top_k=5)[0]))
  seen = set(np.asarray(draw(jax.random.split(jax.random.key(0), 2000))).tolist())
  assert seen == allowed
  assert int(sample_logits(None, logits, temperature=0)[0]) == int(jnp.argmax(logits))


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.5), r"temperature=-0.5: must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0: must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: must lie in \(0, 1\]"),
    (dict(top_k=-1), r"top_k=-1"),
    (dict(min_p=1.5), r"min_p=1.5: must lie in \[0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0: must be > 0"),
    (dict(beam_size=0), r"beam_size=0: must be an integer >= 1"),
    (dict(beam_size=2.5), r"beam_size=2.5: must be an integer >= 1"),
    (dict(length_penalty=-1.0), r"length_penalty=-1.0: must be >= 0"),
    (dict(max_new_tokens=-2), r"max_new_tokens=-2"),
    (dict(max_length=0), r"max_length=0"),
    (dict(beam_size=4, top_p=0.9), r"top_p=0.9: a sampling option, but beam_size=4"),
    (dict(beam_size=4, temperature=0.7), r"temperature=0.7: a sampling option"),
])
def test_bad_options_are_one_line_errors(options, message):
  model = random_markov()
  with pytest.raises(inference.DecodingError, match=message) as error:
    inference.decode(model, [[1, 2]], **dict(dict(max_new_tokens=3), **options))
  assert "\n" not in str(error.value)


def test_bad_prompts_and_sources():
  model = random_markov()
  with pytest.raises(inference.DecodingError, match="prompt 1 has 9 tokens, longer than the "
                                                    "model's context of 8 tokens"):
    inference.decode(model, [[1], np.zeros(9, np.int32)], max_new_tokens=1)
  with pytest.raises(inference.DecodingError, match="prompt 0: need a non-empty 1-D array"):
    inference.decode(model, [np.zeros(0, np.int32)], max_new_tokens=3)
  s2s = tiny_seq2seq(seed=6)
  common = dict(bos_id=BOS, eos_id=EOS)
  with pytest.raises(inference.DecodingError, match="source 1 is empty"):
    inference.decode_sources(s2s, [np.array([5, EOS]), np.array([EOS])], **common)
  too_long = np.concatenate([np.full(30, 7), [EOS]]).astype(np.int32)
  with pytest.raises(inference.DecodingError, match="31 tokens, more than the model's max_len=24"):
    inference.decode_sources(s2s, [too_long], beam_size=2, **common)
  with pytest.raises(inference.DecodingError, match=r"max_new_tokens=24: must be an integer in "
                                                    r"\[1, 23\]"):
    inference.decode_sources(s2s, [too_long[-3:]], max_new_tokens=24, **common)
  with pytest.raises(inference.DecodingError, match="3 prompts for 2 sources"):
    src, _ = pad_sources([too_long[-3:]] * 2, max_len=24, pad_id=0)
    inference.decode(s2s, [[BOS]] * 3, inputs=(src,), max_new_tokens=3)
  # Documented truncation: the first max_len - 1 tokens and </s>.
  cut = inference.decode_sources(s2s, [too_long], truncate=True, max_new_tokens=5, **common)
  assert cut.truncated == 1
  np.testing.assert_array_equal(cut.tokens[0], inference.decode_sources(
      s2s, [too_long[:23].tolist() + [EOS]], max_new_tokens=5, **common).tokens[0])


def test_flags_one_definition_for_every_entry_point():
  generate_flags, translate_flags = flags.FlagValues(), flags.FlagValues()
  cli.define_flags(generate_flags)
  cli.define_flags(translate_flags, beam_size=4, temperature=0.0, max_new_tokens=None)
  assert set(generate_flags) == set(translate_flags)
  translate_flags(["translate"])  # beam search: the sampling defaults are not asked for
  assert cli.options(translate_flags) == dict(
      max_new_tokens=None, max_length=None, beam_size=4, length_penalty=0.6,
      early_stopping=False, seed=0)
  translate_flags.unparse_flags()
  translate_flags(["translate", "--beam_size=1", "--temperature=0.8", "--top_p=0.9", "--seed=0"])
  assert cli.options(translate_flags)["top_p"] == 0.9
  generate_flags(["generate", "--beam_size=4", "--max_new_tokens=30"])  # temperature 0.8 dropped
  assert "temperature" not in cli.options(generate_flags)
  generate_flags.unparse_flags()
  generate_flags(["generate", "--beam_size=4", "--temperature=0.5"])
  with pytest.raises(inference.DecodingError, match="temperature=0.5: a sampling option"):
    cli.options(generate_flags)
  generate_flags.unparse_flags()
  generate_flags(["generate", "--top_p=1.5"])
  with pytest.raises(inference.DecodingError, match=r"top_p=1.5: must lie in \(0, 1\]"):
    cli.options(generate_flags)

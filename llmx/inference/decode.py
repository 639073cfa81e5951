"""One entry to decoding for every model of the cache protocol (protocol.py).

  decode(model, prompts, *, inputs=(), **options) -> Decoded
      sampling or greedy (beam_size 1) or beam search, for a batch of prompts of any lengths.
  generate(model, prompts, **options) -> tokens: one array for one prompt, else a list.
  decode_sources(model, sources, *, bos_id, eos_id, **options) -> Decoded
      an encoder-decoder's targets: each source decoded from <s> until </s>.

Prompts are right-padded: row i's prompt fills positions 0..len_i-1 and its new tokens follow, so
a token's position is its index in the row and its cache slot is its position. Each call is one
compiled program (prefill and a `jax.lax.while_loop`), kept for later calls of the same shapes
and static options; temperature, top_p, min_p, the repetition penalty and the seed are traced
values, so changing them compiles nothing.

`use_cache=False` decodes the same way through the model's plain forward pass (every token
re-reads its row): the reference the cache is tested against, and the baseline of
experiments/bench_generation.py.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.inference.beam import beam_loop
from llmx.inference.prompts import DecodingError, pad_prompts, pad_sources, prompt_list
from llmx.inference.protocol import Cached, Uncached
from llmx.inference.sampling import STREAM, sample_loop

# The value of each sampling option that asks for no sampling (None means it too): greedy.
SAMPLING_OFF = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# One call's cap on new tokens: 1e8 tokens would run for days with nothing to show.
MAX_NEW_TOKENS = 1 << 16


def check_options(*, max_new_tokens: int, max_length: int | None = None,
                  temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, beam_size: int = 1,
                  length_penalty: float = 0.6, early_stopping: bool = False, seed: int = 0):
  """Raises DecodingError naming the first bad option."""
  del early_stopping, seed
  if not _is_int(max_new_tokens) or max_new_tokens < 0:
    raise DecodingError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
  if max_new_tokens > MAX_NEW_TOKENS:
    raise DecodingError(f"max_new_tokens={max_new_tokens}: at most {MAX_NEW_TOKENS:,} per call "
                        f"(beyond the context the window slides, one full forward pass per "
                        f"token); generate in pieces")
  if max_length is not None and (not _is_int(max_length) or max_length <= 0):
    raise DecodingError(f"max_length={max_length!r}: must be an integer > 0, or None for no limit")
  if not temperature >= 0:
    raise DecodingError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
  if top_k is not None and (not _is_int(top_k) or top_k < 0):
    raise DecodingError(f"top_k={top_k!r}: must be an integer >= 1, or 0/None for no top-k filter")
  if top_p is not None and not 0 < top_p <= 1:
    raise DecodingError(f"top_p={top_p}: must lie in (0, 1] (1 or None: no top-p filter)")
  if min_p is not None and not 0 <= min_p <= 1:
    raise DecodingError(f"min_p={min_p}: must lie in [0, 1] (0 or None: no min-p filter)")
  if repetition_penalty is not None and not repetition_penalty > 0:
    raise DecodingError(f"repetition_penalty={repetition_penalty}: must be > 0 (1 or None: none)")
  if not _is_int(beam_size) or beam_size < 1:
    raise DecodingError(f"beam_size={beam_size!r}: must be an integer >= 1 (1: sampling or greedy)")
  if not length_penalty >= 0:
    raise DecodingError(f"length_penalty={length_penalty}: must be >= 0")
  if beam_size > 1:
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty)
    for name, value in given.items():
      if value is not None and value != SAMPLING_OFF[name]:
        raise DecodingError(f"{name}={value}: a sampling option, but beam_size={beam_size} "
                            f"searches without sampling; give beam_size=1 to sample")


@dataclasses.dataclass
class Decoded:
  tokens: list              # per row: int32 [prompt + new tokens] (a stop kept); beam: the best
  prompt_lengths: np.ndarray  # int [rows]
  scores: np.ndarray        # [rows]: summed log-probs of the new tokens (beam: / length penalty)
  beams: list | None        # beam search: per row, beam_size hypotheses (as tokens), best first
  beam_scores: np.ndarray | None  # beam search: [rows, beam_size], descending (-inf: none)
  new_tokens: int           # new tokens over all rows (beam: of the best hypotheses)
  compile_s: float          # tracing and compilation (0 when the program was compiled before)
  run_s: float              # prefill and decoding
  truncated: int = 0        # decode_sources: sources cut to the model's length

  @property
  def continuations(self) -> list:
    """Per row: the new tokens alone."""
    return [t[n:] for t, n in zip(self.tokens, self.prompt_lengths)]

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.run_s if self.run_s > 0 else float("inf")


def decode(model: nnx.Module, prompts, *, inputs: tuple = (), max_new_tokens: int,
           max_length: int | None = None, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float | None = None, stop_tokens=(), beam_size: int = 1,
           length_penalty: float = 0.6, early_stopping: bool = False, seed: int = 0,
           use_cache: bool = True, on_token=None, pad_to: int = 1) -> Decoded:
  """Continues each prompt (int arrays of any lengths up to the model's max_decode_len).

  inputs: what conditions the text, as the model's init_cache takes it (encoder-decoder: the
  padded sources int [sources, S]; the prompts are then a multiple of the sources, in order).
  A row ends after max_new_tokens new tokens, at max_length tokens in all (prompt included), or
  at its first token in stop_tokens (kept), whichever comes first.
  beam_size 1 is greedy (temperature 0, the default) or samples (temperature > 0): top_k
  (0/None: off), top_p (1/None: off), min_p (0/None: off), seed; repetition_penalty (1/None:
  off) applies to both. beam_size > 1 searches (beam.py): length_penalty (GNMT alpha),
  early_stopping; the sampling options (repetition_penalty too) must stay off.
  on_token(tokens int [rows], active bool [rows]): called on the host with each step's tokens as
  the loop chooses them (streaming; sampling and greedy only). pad_to: the prompts' padded width
  is rounded up to a multiple of this, so that prompts of similar lengths (a chat's turns) share
  one compiled program.
  """
  check_options(max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                beam_size=beam_size, length_penalty=length_penalty)
  context = model.max_decode_len
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  batch, lengths = pad_prompts(prompts, context, vocab)
  if max_length is not None and max_length < lengths.max():
    raise DecodingError(f"max_length={max_length} is shorter than the longest prompt "
                        f"({int(lengths.max())} tokens): it counts the prompt too")
  if pad_to > 1:
    width = min(context, -(-batch.shape[1] // pad_to) * pad_to)
    batch = np.pad(batch, ((0, 0), (0, width - batch.shape[1])))
  if on_token is not None and beam_size > 1:
    raise DecodingError("on_token: streaming needs beam_size 1 (beam search settles its tokens "
                        "only at the end)")
  inputs = tuple(jnp.asarray(x) for x in inputs)
  for x in inputs:
    if len(batch) % x.shape[0]:
      raise DecodingError(f"{len(batch)} prompts for {x.shape[0]} sources: give each source "
                          f"the same number of prompts")
  limits = lengths + max_new_tokens
  if max_length is not None:
    limits = np.maximum(np.minimum(limits, max_length), lengths)
  static = dict(use_cache=bool(use_cache), slide=bool(limits.max() > context),
                cache_len=min(context, batch.shape[1] + max_new_tokens),
                max_new=int(max_new_tokens), stop_tokens=tuple(int(t) for t in stop_tokens))
  graphdef, state = nnx.split(model)
  if beam_size == 1:
    static.update(greedy=not temperature, top_k=top_k or None,
                  top_p_on=top_p is not None and top_p < 1, stream=on_token is not None)
    args = (state, batch, lengths, limits.astype(np.int32), inputs, jax.random.key(seed),
            np.float32(temperature or 1.0), np.float32(top_p or 1.0), np.float32(min_p or 0.0),
            np.float32(repetition_penalty or 1.0))
    STREAM.sink = on_token
    try:
      (tokens, out_len, scores), compile_s, run_s = _run(_sample_program, graphdef, args, static)
    finally:
      STREAM.sink = None
    return Decoded(tokens=[tokens[i, :out_len[i]] for i in range(len(out_len))],
                   prompt_lengths=lengths, scores=scores, beams=None, beam_scores=None,
                   new_tokens=int((out_len - lengths).sum()), compile_s=compile_s, run_s=run_s)
  static.update(beam_size=int(beam_size), alpha=float(length_penalty),
                early_stopping=bool(early_stopping))
  args = (state, batch, lengths, (limits - lengths).astype(np.int32), inputs)
  (tokens, new, scores), compile_s, run_s = _run(_beam_program, graphdef, args, static)
  beams = [[tokens[i, j, :lengths[i] + new[i, j]] for j in range(beam_size)]
           for i in range(len(lengths))]
  return Decoded(tokens=[row[0] for row in beams], prompt_lengths=lengths, scores=scores[:, 0],
                 beams=beams, beam_scores=scores, new_tokens=int(new[:, 0].sum()),
                 compile_s=compile_s, run_s=run_s)


def generate(model: nnx.Module, prompts, **options):
  """`decode`'s tokens: one int32 array for one prompt (1-D), else a list of them."""
  _, single = prompt_list(prompts)
  tokens = decode(model, prompts, **options).tokens
  return tokens[0] if single else tokens


def decode_sources(model: nnx.Module, sources, *, bos_id: int, eos_id: int,
                   truncate: bool = False, max_new_tokens: int | None = None, stop_tokens=(),
                   **options) -> Decoded:
  """Token-id sources (each ending in </s>) -> their targets, for an encoder-decoder whose
  config has max_len and pad_id (llmx.families.seq2seq). Each row starts at <s> and ends at </s>
  (kept); `continuations` are the targets. Options as `decode`'s.

  Sources are padded by `pad_sources` (an empty one, or one over max_len tokens unless
  truncate, is an error). max_new_tokens: longest target (</s> included); default
  min(max_len - 1, 2 * S + 10) for sources padded to S tokens.
  """
  c = model.config
  src, truncated = pad_sources(sources, max_len=c.max_len, pad_id=c.pad_id, eos_id=eos_id,
                               truncate=truncate)
  limit = model.max_decode_len - 1
  if max_new_tokens is None:
    max_new_tokens = min(limit, 2 * src.shape[1] + 10)
  if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= limit:
    raise DecodingError(f"max_new_tokens={max_new_tokens!r}: must be an integer in [1, {limit}] "
                        f"(the model's max_len - 1)")
  result = decode(model, np.full((len(src), 1), bos_id, np.int32), inputs=(src,),
                  max_new_tokens=max_new_tokens, stop_tokens=(eos_id, *stop_tokens), **options)
  result.truncated = truncated
  return result


def _stepper(model, inputs, *, use_cache, cache_len, slide):
  return (Cached if use_cache else Uncached)(model, inputs, cache_len=cache_len, slide=slide)


def _sample_program(graphdef, state, prompts, lengths, limits, inputs, key, temperature, top_p,
                    min_p, penalty, *, use_cache, cache_len, slide, **loop_options):
  stepper = _stepper(nnx.merge(graphdef, state), inputs, use_cache=use_cache,
                     cache_len=cache_len, slide=slide)
  return sample_loop(stepper, prompts, lengths, limits, key, temperature, top_p, min_p, penalty,
                     **loop_options)


def _beam_program(graphdef, state, prompts, lengths, new_limits, inputs, *, use_cache,
                  cache_len, slide, **loop_options):
  stepper = _stepper(nnx.merge(graphdef, state), inputs, use_cache=use_cache,
                     cache_len=cache_len, slide=slide)
  return beam_loop(stepper, prompts, lengths, new_limits, **loop_options)


_COMPILED: dict = {}


def _run(program, graphdef, args, static):
  """-> (outputs as numpy, compile seconds, run seconds). The program is compiled once for its
  shapes and static options, then reused."""
  signature = (program, graphdef, tuple(sorted(static.items())),
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
  start = time.perf_counter()
  if signature not in _COMPILED:
    if len(_COMPILED) >= 16:  # models come and go (tests, notebooks): keep memory bounded
      _COMPILED.clear()
    fn = functools.partial(program, graphdef, **static)
    _COMPILED[signature] = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(_COMPILED[signature](*args))
  run_s = time.perf_counter() - start
  return jax.tree.map(np.asarray, out), compile_s, run_s

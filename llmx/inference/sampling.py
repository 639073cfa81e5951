"""Sampling from a causal language model with a key/value cache.

`generate` runs a batch of prompts of different lengths: one prefill pass writes every prompt's
keys and values into a per-layer cache, then a `jax.lax.while_loop` adds one token per row per
step (greedy, or temperature / top-k / top-p sampling), so the whole generation is one compiled
program, whatever the number of tokens. A row stops at a stop token or at its length limit; the
loop ends when every row has stopped.

Prompts are right-padded: row i's prompt fills positions 0..len_i-1 and its new tokens follow, so
position = index in the row and the cache slot of a token is its position. A row whose text
outgrows the model's context (block_size) is re-prefilled from its last block_size // 2 tokens,
positions restarting at 0 (so past the context the text differs from `generate_uncached`, which
re-reads a full window for every token).

The model needs `init_cache(batch, max_len)`, `decode(tokens, positions, cache) -> (hidden,
cache)`, `logits(hidden)` and `config.block_size` (llmx.families.lm.model.GPT has them).
`generate_uncached` needs only `model(tokens) -> logits`: the reference the cache is tested
against, and the baseline of experiments/bench_generation.py.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.errors import LlmxError


class GenerationError(LlmxError, ValueError):
  """Bad generation arguments: the message names the argument, its value and what is valid."""


def check_sampling_args(*, max_new_tokens: int, temperature: float, top_k: int | None = None,
                        top_p: float | None = None, max_length: int | None = None):
  if max_new_tokens < 0:
    raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 0")
  if not temperature >= 0:
    raise GenerationError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
  if top_k is not None and top_k < 0:
    raise GenerationError(f"top_k={top_k}: must be >= 1, or 0/None for no top-k filter")
  if top_p is not None and not 0 < top_p <= 1:
    raise GenerationError(f"top_p={top_p}: must lie in (0, 1] (1 or None: no top-p filter)")
  if max_length is not None and max_length <= 0:
    raise GenerationError(f"max_length={max_length}: must be > 0, or None for no limit")


def filter_logits(logits, *, top_k: int | None = None, top_p=None):
  """logits [batch, vocab] -> the same with -inf outside the allowed tokens.

  top_k: exactly the k largest logits of each row stay (ties go to the lower token id).
  top_p (nucleus): of the tokens left, the smallest most-likely-first set whose probability
  reaches top_p stays; the most likely token always stays.
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
  return logits


def sample_logits(key, logits, *, temperature, top_k: int | None = None, top_p=None,
                  greedy: bool | None = None):
  """logits: [batch, vocab] -> token ids int32 [batch]. Greedy (argmax) when temperature is 0;
  `greedy` says so statically when temperature is a traced value."""
  greedy = (temperature == 0) if greedy is None else greedy
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: list        # per prompt: int32 [prompt length + new tokens], a stop token included
  new_tokens: int     # tokens generated over all rows
  compile_s: float    # tracing and compilation (0 when the program was cached)
  run_s: float        # prefill and decoding

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.run_s if self.run_s > 0 else float("inf")


def _prompt_list(prompts) -> tuple[list, bool]:
  """-> (list of 1-D arrays, whether a single prompt was given)."""
  if hasattr(prompts, "ndim"):  # one numpy/jax array: 1-D is one prompt, 2-D a batch of rows
    prompts = np.asarray(prompts)
    return ([prompts], True) if prompts.ndim <= 1 else (list(prompts), False)
  prompts = list(prompts)
  if prompts and all(np.ndim(p) == 0 for p in prompts):  # a list of ids
    return [np.asarray(prompts)], True
  return [np.asarray(p) for p in prompts], False


def _prompt_batch(prompts, context: int):
  prompts, _ = _prompt_list(prompts)
  if not prompts:
    raise GenerationError("prompts: need at least one prompt")
  for i, p in enumerate(prompts):
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
      raise GenerationError(f"prompt {i}: need a non-empty 1-D array of token ids, got shape "
                            f"{p.shape} dtype {p.dtype}")
    if p.size > context:
      raise GenerationError(f"prompt {i} has {p.size} tokens, longer than the model's context "
                            f"of {context} tokens (block_size): shorten the prompt")
  lengths = np.array([p.size for p in prompts], np.int32)
  batch = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :p.size] = p
  return batch, lengths


def generate_batch(model: nnx.Module, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
                   max_length: int | None = None, seed: int = 0) -> Generation:
  """Continues each prompt (int arrays, any lengths up to block_size) with the KV cache.

  A row ends after max_new_tokens new tokens, at max_length tokens in all (prompt included), or
  at the first token in stop_tokens (kept in the output), whichever comes first.
  temperature 0 is greedy; top_k (0/None: off) and top_p (None or 1: off) filter the sampling.
  """
  check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, max_length=max_length)
  context = model.config.block_size
  batch, lengths = _prompt_batch(prompts, context)
  limits = lengths + max_new_tokens
  if max_length is not None:
    limits = np.minimum(limits, max_length)
  limits = np.maximum(limits, lengths)
  graphdef, state = nnx.split(model)
  static = dict(max_new_tokens=int(max_new_tokens), greedy=temperature == 0, top_k=top_k or None,
                top_p_on=top_p is not None and top_p < 1,
                stop_tokens=tuple(int(t) for t in stop_tokens), context=context,
                may_outgrow_context=bool(limits.max() > context))
  args = (state, jnp.asarray(batch), jnp.asarray(lengths), jnp.asarray(limits, jnp.int32),
          jax.random.key(seed), jnp.float32(temperature or 1.0), jnp.float32(top_p or 1.0))
  start = time.perf_counter()
  compiled = _compiled(graphdef, args, **static)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  tokens, out_len = jax.block_until_ready(compiled(*args))
  run_s = time.perf_counter() - start
  tokens, out_len = np.asarray(tokens), np.asarray(out_len)
  rows = [tokens[i, :out_len[i]] for i in range(len(out_len))]
  return Generation(tokens=rows, new_tokens=int((out_len - lengths).sum()),
                    compile_s=compile_s, run_s=run_s)


def generate(model: nnx.Module, prompts, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
             max_length: int | None = None, seed: int = 0, block_size: int | None = None):
  """`generate_batch`'s tokens: one int32 array for a 1-D prompt, a list for a list of prompts.

  block_size: accepted for callers of the uncached generator; the cache uses the model's own.
  """
  if block_size is not None and block_size > model.config.block_size:
    raise GenerationError(f"block_size={block_size} exceeds the model's block_size="
                          f"{model.config.block_size}")
  _, single = _prompt_list(prompts)
  out = generate_batch(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, max_length=max_length,
                       seed=seed).tokens
  return out[0] if single else out


_CACHE: dict = {}


def _compiled(graphdef, args, **static):
  """The compiled generation program for these shapes and options (compiled once, then reused)."""
  signature = (graphdef, tuple(static.items()),
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
  if signature not in _CACHE:
    if len(_CACHE) >= 8:  # models come and go (tests, notebooks): keep memory bounded
      _CACHE.clear()
    fn = functools.partial(_generate_cached, graphdef, **static)
    _CACHE[signature] = jax.jit(fn).lower(*args).compile()
  return _CACHE[signature]


def _generate_cached(graphdef, state, prompts, lengths, limits, key, temperature, top_p, *,
                     max_new_tokens, greedy, top_k, top_p_on, stop_tokens, context,
                     may_outgrow_context):
  """prompts int [b, P] right-padded, lengths/limits int [b] -> (tokens [b, P + new], lengths)."""
  model = nnx.merge(graphdef, state)
  b, p = prompts.shape
  rows = jnp.arange(b)
  width = p + max_new_tokens
  keep = max(context // 2, 1)  # tokens kept when a row outgrows the context
  tokens = jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompts)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  hidden, cache = model.decode(prompts, jnp.broadcast_to(jnp.arange(p), (b, p)),
                               model.init_cache(b, context))
  logits = model.logits(hidden[rows, lengths - 1])

  def refill(tokens, out_len):
    """A fresh cache holding each row's last `keep` tokens before its newest one."""
    n = jnp.minimum(out_len - 1, keep)
    index = jnp.clip(out_len[:, None] - 1 - n[:, None] + jnp.arange(keep), 0, width - 1)
    window = jnp.take_along_axis(tokens, index, axis=1)
    _, cache = model.decode(window, jnp.broadcast_to(jnp.arange(keep), (b, keep)),
                            model.init_cache(b, context))
    return cache, n

  def body(carry):
    i, tokens, out_len, cache_len, cache, logits, done, key = carry
    key, sub = jax.random.split(key)
    token = sample_logits(sub, logits, temperature=temperature, top_k=top_k,
                          top_p=top_p if top_p_on else None, greedy=greedy)
    slot = jnp.minimum(out_len, width - 1)
    tokens = tokens.at[rows, slot].set(jnp.where(done, tokens[rows, slot], token))
    out_len = out_len + (~done).astype(jnp.int32)
    done = done | jnp.any(token[:, None] == stops[None], axis=1) | (out_len >= limits)
    if may_outgrow_context:  # a row whose cache is full goes on from a re-read of its last tokens
      cache, cache_len = jax.lax.cond(
          jnp.any(~done & (cache_len >= context)), refill, lambda t, o: (cache, cache_len),
          tokens, out_len)
    position = jnp.minimum(cache_len, context - 1)  # stopped rows may sit at the end
    hidden, cache = model.decode(token[:, None], position[:, None], cache)
    return (i + 1, tokens, out_len, cache_len + 1, cache, model.logits(hidden[:, 0]), done, key)

  def cond(carry):
    i, done = carry[0], carry[6]
    return (i < max_new_tokens) & ~jnp.all(done)

  carry = (jnp.int32(0), tokens, lengths, lengths, cache, logits, lengths >= limits, key)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[1], carry[2]


def generate_uncached(model: nnx.Module, prompt: np.ndarray, *, max_new_tokens: int,
                      block_size: int | None = None, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None,
                      seed: int = 0) -> np.ndarray:
  """Continues one prompt (int [T0]) by `max_new_tokens` tokens without a cache: each new token
  re-reads the last `block_size` tokens through the whole model. One compiled loop; greedy by
  default. `model(tokens [1, T]) -> logits [1, T, vocab]`. Returns int [T0 + max_new_tokens]."""
  check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p)
  block_size = block_size or model.config.block_size
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 1 or prompt.size == 0:
    raise GenerationError(f"prompt: need a non-empty 1-D token array, got shape {prompt.shape}")
  if prompt.size > block_size:
    raise GenerationError(f"prompt has {prompt.size} tokens, longer than the context of "
                          f"{block_size} tokens (block_size)")
  graphdef, state = nnx.split(model)
  # The prompt goes in a buffer of a fixed size with its length as a value, so prompts of any
  # length share one compiled program.
  tokens = np.zeros(block_size + max_new_tokens, np.int32)
  tokens[:prompt.size] = prompt
  out = _generate_uncached(graphdef, state, jnp.asarray(tokens), jnp.int32(prompt.size),
                           jax.random.key(seed), jnp.float32(temperature or 1.0),
                           jnp.float32(top_p or 1.0), max_new_tokens, block_size,
                           temperature == 0, top_k or None, top_p is not None and top_p < 1)
  return np.asarray(out)[:prompt.size + max_new_tokens]


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11))
def _generate_uncached(graphdef, state, tokens, n_prompt, key, temperature, top_p,
                       max_new_tokens, block_size, greedy, top_k, top_p_on):
  model = nnx.merge(graphdef, state)

  def body(i, carry):
    tokens, key = carry
    position = n_prompt + i  # where the new token goes
    start = jnp.maximum(position - block_size, 0)
    window = jax.lax.dynamic_slice(tokens, (start,), (block_size,))
    logits = model(window[None])[0]
    # Causal attention: the zeros after `position` do not reach the logits before it.
    last = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, keepdims=False)
    key, sub = jax.random.split(key)
    token = sample_logits(sub, last[None].astype(jnp.float32), temperature=temperature,
                          top_k=top_k, top_p=top_p if top_p_on else None, greedy=greedy)[0]
    return tokens.at[position].set(token), key

  tokens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, key))
  return tokens

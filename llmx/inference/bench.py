"""Cached against uncached decoding: the speed-up of the key/value cache, and whether the two
give the same tokens (experiments/bench_generation.py)."""
import statistics
import time

import numpy as np

from llmx.inference.decode import generate


def timed(fn, rounds: int):
  """-> (fn's last output, median seconds of `rounds` calls after one untimed warm-up call)."""
  out = fn()  # compile and warm up
  seconds = []
  for _ in range(rounds):
    start = time.perf_counter()
    out = fn()
    seconds.append(time.perf_counter() - start)
  return out, statistics.median(seconds)


def cached_vs_uncached(model, prompt, *, new_tokens: int, rounds: int = 3) -> dict:
  """Greedy decoding of one prompt (int [T]) with the cache and without (every token re-reads
  the whole window through the model), each compiled before it is timed."""
  def greedy(use_cache):
    return generate(model, prompt, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
  uncached, uncached_s = timed(lambda: greedy(False), rounds)
  cached, cached_s = timed(lambda: greedy(True), rounds)
  same = np.array_equal(uncached, cached)
  return dict(uncached_s=uncached_s, cached_s=cached_s, speedup=uncached_s / cached_s,
              identical=same, first_difference=None if same else int(np.argmax(uncached != cached)))

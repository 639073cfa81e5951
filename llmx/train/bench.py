"""Timing a train step outside the loop: what `experiments.bench_train_step` reports."""
import time

import jax
import jax.numpy as jnp

from llmx.train.step import Trainable


def time_train_step(trainable: Trainable, batches: list, *, steps: int, rounds: int,
                    warmup: int = 5) -> tuple[list[float], dict]:
  """-> (ms/step of each round, the last step's metrics). Runs `rounds` rounds of `steps` steps
  over `batches` in turn after `warmup` steps (compilation); report the median round, since a
  shared machine drifts by tens of percent within minutes."""
  state = trainable.init()
  step_fn = jax.jit(trainable.train_step, donate_argnums=0)
  batches = [jnp.asarray(b) for b in batches]
  for i in range(warmup):
    state, metrics = step_fn(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  round_ms = []
  for _ in range(rounds):
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    round_ms.append(1e3 * (time.perf_counter() - start) / steps)
  return round_ms, {k: float(v) for k, v in metrics.items()}

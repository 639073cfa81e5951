"""Timing a train step outside the loop: what `experiments.bench_train_step` reports."""
import time

import jax
import jax.numpy as jnp

from llmx.train.step import Trainable


def _placed(trainable: Trainable, mesh):
  """-> (jitted train step, initial state, batch placer): on the default device, or with `mesh`
  placed as the loop places them (state by the sharding rules, batches over the data axes)."""
  if mesh is None:
    return jax.jit(trainable.train_step, donate_argnums=0), trainable.init(), jnp.asarray
  from llmx.train.mesh import batch_sharding
  from llmx.train.sharding import state_shardings
  state_sharding = state_shardings(jax.eval_shape(trainable.init), mesh)
  state = jax.jit(trainable.init, out_shardings=state_sharding)()
  step_fn = jax.jit(trainable.train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                    donate_argnums=0)
  return step_fn, state, lambda b: jax.device_put(jnp.asarray(b), batch_sharding(mesh))


def time_train_step(trainable: Trainable, batches: list, *, steps: int, rounds: int,
                    warmup: int = 5, mesh=None) -> tuple[list[float], dict]:
  """-> (ms/step of each round, the last step's metrics). Runs `rounds` rounds of `steps` steps
  over `batches` in turn after `warmup` steps (compilation); report the median round, since a
  shared machine drifts by tens of percent within minutes. mesh: run sharded over it."""
  step_fn, state, put = _placed(trainable, mesh)
  batches = [put(b) for b in batches]
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


def step_memory(trainable: Trainable, batch, mesh=None) -> dict:
  """Bytes per device of the compiled train step (XLA's memory analysis): `temp` (activations
  and scratch) and `peak` (arguments + outputs + temp - donated)."""
  step_fn, state, put = _placed(trainable, mesh)
  m = step_fn.lower(state, put(batch)).compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return dict(temp=int(m.temp_size_in_bytes), peak=int(peak))

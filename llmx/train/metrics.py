"""Metrics: `metrics.jsonl` (one object per line with `step`) and TensorBoard event files; the
devices' peak FLOP/s for MFU."""
import functools
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp

log = logging.getLogger("llmx")

# Dense bfloat16 peak FLOP/s per device (spec sheets), matched as substrings of device_kind.
PEAK_FLOPS_BY_KIND = {
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v4": 275e12, "TPU v3": 123e12, "TPU v2": 45e12,
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "L4": 121e12, "A10G": 70e12, "V100": 125e12,
}


class MetricsWriter:
  """Writes on process 0 only; on resume, drops logged lines past the restored step so the
  curve has no duplicate or orphaned steps (and a last line cut short by a kill)."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if _step_of(line) is not None and _step_of(line) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def peak_flops(devices) -> float:
  """Total peak FLOP/s of `devices`: the spec sheet's dense bf16 figure for known accelerators;
  on CPU, the measured rate of a float32 matmul on this host per process (simulated CPU devices
  share the host's cores). 0.0 when unknown."""
  devices = list(devices)
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    return _host_matmul_flops() * len({d.process_index for d in devices})
  for name, flops in PEAK_FLOPS_BY_KIND.items():
    if name.lower() in kind.lower():
      return flops * len(devices)
  log.info("no peak FLOP/s known for %r: no MFU column", kind)
  return 0.0


@functools.lru_cache(maxsize=1)
def _host_matmul_flops(n: int = 1024, repeats: int = 20) -> float:
  # The best of many short runs: on a shared host most runs lose time slices to other jobs, and
  # a low peak would read as an MFU above 1. Under sustained load it still can.
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best

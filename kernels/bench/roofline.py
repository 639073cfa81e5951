"""Peak compute and memory bandwidth per device kind, for percent-of-peak figures.

Numbers are vendor datasheet peaks for dense math (no structured sparsity). ``f32`` on
NVIDIA GPUs is the TF32 tensor-core rate (what XLA and Triton use for float32 dots by
default); on TPUs float32 matmuls run as multi-pass bf16 and have no single peak, so it
is left out. Datasheet bandwidth is never reached: the bench tool's
``--measure-ceiling`` times a device copy and a large matmul and uses those instead.
``add_percent_of_peak`` puts a benchmark row's percent of the bound that applies (compute or
bandwidth, by the row's arithmetic intensity against the device's balance) into the row.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  name: str
  patterns: tuple[str, ...]      # lower-case substrings of jax's device_kind
  tflops: dict                   # dtype name ("bf16", "f16", "f32") -> dense TFLOP/s
  hbm_gbps: float                # memory bandwidth, GB/s (1e9 bytes/s)
  source: str = "datasheet"


# Order matters: the first spec whose pattern occurs in the device kind wins.
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("H200", ("h200",), {"bf16": 989.0, "f16": 989.0, "f32": 494.0}, 4800.0),
    DeviceSpec("H100 PCIe", ("h100 pcie",), {"bf16": 756.0, "f16": 756.0, "f32": 378.0}, 2000.0),
    DeviceSpec("H100 NVL", ("h100 nvl",), {"bf16": 835.0, "f16": 835.0, "f32": 417.0}, 3900.0),
    DeviceSpec("H100 SXM", ("h100",), {"bf16": 989.0, "f16": 989.0, "f32": 494.0}, 3350.0),
    DeviceSpec("A100 40GB", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"),
               {"bf16": 312.0, "f16": 312.0, "f32": 156.0}, 1555.0),
    DeviceSpec("A100 80GB PCIe", ("a100-pcie-80gb", "a100 80gb pcie"),
               {"bf16": 312.0, "f16": 312.0, "f32": 156.0}, 1935.0),
    DeviceSpec("A100 80GB", ("a100",), {"bf16": 312.0, "f16": 312.0, "f32": 156.0}, 2039.0),
    DeviceSpec("L40S", ("l40s",), {"bf16": 362.0, "f16": 362.0, "f32": 183.0}, 864.0),
    DeviceSpec("L4", ("l4",), {"bf16": 121.0, "f16": 121.0, "f32": 60.0}, 300.0),
    DeviceSpec("A10G", ("a10g",), {"bf16": 125.0, "f16": 125.0, "f32": 62.5}, 600.0),  # A10 sheet
    DeviceSpec("B200", ("b200",), {"bf16": 2250.0, "f16": 2250.0, "f32": 1100.0}, 8000.0),
    DeviceSpec("RTX 4090", ("rtx 4090",), {"bf16": 165.0, "f16": 165.0, "f32": 82.6}, 1008.0),
    # V100 tensor cores do float16 only (no bfloat16, no TF32).
    DeviceSpec("V100", ("v100",), {"f16": 125.0}, 900.0),
    # TPU device kinds: "TPU v4", "TPU v5 lite" (v5e), "TPU v5p"/"TPU v5", "TPU v6 lite" (v6e).
    DeviceSpec("TPU v6e", ("v6 lite", "v6e"), {"bf16": 918.0}, 1640.0),
    DeviceSpec("TPU v5e", ("v5 lite", "v5e", "v5litepod"), {"bf16": 197.0}, 819.0),
    DeviceSpec("TPU v5p", ("v5p", "tpu v5"), {"bf16": 459.0}, 2765.0),
    DeviceSpec("TPU v4", ("v4",), {"bf16": 275.0}, 1228.0),
)

_DTYPE_KEY = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def lookup(device_kind: str) -> DeviceSpec | None:
  kind = device_kind.lower()
  for spec in DEVICES:
    if any(p in kind for p in spec.patterns):
      return spec
  return None


def peak_tflops(spec: DeviceSpec | None, dtype) -> float | None:
  if spec is None:
    return None
  return spec.tflops.get(_DTYPE_KEY.get(jnp.dtype(dtype).name, ""), None)


def _median_time(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def measure_ceiling(dtype=jnp.bfloat16, *, copy_bytes: int | None = None,
                    matmul_n: int | None = None, device: jax.Device | None = None) -> DeviceSpec:
  """Measured copy bandwidth (read + write) and matmul throughput on this device."""
  device = device or jax.devices()[0]
  on_cpu = device.platform == "cpu"
  copy_bytes = copy_bytes or (64 << 20 if on_cpu else 1 << 30)
  matmul_n = matmul_n or (1024 if on_cpu else 8192)
  n = copy_bytes // 4
  x = jax.device_put(jnp.arange(n, dtype=jnp.float32), device)
  copy = jax.jit(lambda a: a * 1.0001)  # one read, one write; cannot be elided
  t_copy = _median_time(copy, x)
  gbps = 2 * n * 4 / t_copy / 1e9
  a = jax.device_put(jnp.ones((matmul_n, matmul_n), dtype), device)
  mm = jax.jit(lambda p, q: p @ q)
  t_mm = _median_time(mm, a, a, reps=5)
  tflops = 2 * matmul_n ** 3 / t_mm / 1e12
  key = _DTYPE_KEY.get(jnp.dtype(dtype).name, "f32")
  return DeviceSpec(f"measured {device.device_kind}", (), {key: tflops}, gbps, source="measured")


def add_percent_of_peak(row: dict, device_spec: DeviceSpec | None, dtype, *,
                        memory_bound: bool) -> dict:
  """Adds ``bound`` ("memory"/"compute"), ``pct_peak`` and ``peak_source`` to a timed row
  (one with ``flops``, ``bytes``, ``tflops``, ``gbps``); unchanged without a device spec.

  ``memory_bound`` is the op's own guess, used when the device has no compute peak for
  ``dtype``; with one, the row's arithmetic intensity decides.
  """
  if device_spec is None:
    return row
  peak_tf = peak_tflops(device_spec, dtype)
  bw_frac = row["gbps"] / device_spec.hbm_gbps
  flop_frac = row["tflops"] / peak_tf if peak_tf else None
  if peak_tf:  # decide by arithmetic intensity against the machine balance
    memory_bound = row["flops"] / row["bytes"] < peak_tf * 1e12 / (device_spec.hbm_gbps * 1e9)
  row["bound"] = "memory" if memory_bound or flop_frac is None else "compute"
  row["pct_peak"] = 100 * (bw_frac if row["bound"] == "memory" else flop_frac)
  row["peak_source"] = device_spec.source
  return row

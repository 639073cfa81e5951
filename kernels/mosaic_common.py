"""Helpers the Pallas TPU (Mosaic) kernels share: interpret mode, padding, tiling.

(Output structs under ``shard_map``, shared with the Triton kernels, are in ``pallas_common``.)

Mosaic needs the last two dimensions of every block to be multiples of (8, 128) (16 rows
for 2-byte dtypes, so a block holds whole packed tiles) or the whole array dimension. The
kernels pad their operands to such multiples inside the op and slice the results back.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

LANES = 128


def interpret_mode(interpret: bool):
  """``pallas_call(interpret=...)``: Pallas's TPU interpreter (runs on CPU) or compile."""
  return pltpu.InterpretParams() if interpret else False


def compiler_params(*semantics: str):
  return pltpu.CompilerParams(dimension_semantics=tuple(semantics))


def sublanes(dtype) -> int:
  """Row multiple of a block for ``dtype``: 8 for 4-byte, 16 for 2-byte, 32 for 1-byte."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_to(x, shape, value=0):
  """Pads ``x`` at the end of each axis up to ``shape`` (no copy when already there)."""
  pads = [(0, s - d) for d, s in zip(x.shape, shape)]
  if not any(p for _, p in pads):
    return x
  return jnp.pad(x, pads, constant_values=value)


def row_block(rows: int, row_elems: int, dtype, *, target_elems: int = 1 << 18,
              max_rows: int = 1024) -> int:
  """Rows per block: about ``target_elems`` elements, a multiple of ``sublanes(dtype)``."""
  m = sublanes(dtype)
  br = max(m, min(max_rows, target_elems // max(row_elems, 1)) // m * m)
  return min(br, round_up(rows, m))

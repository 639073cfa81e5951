"""xla_chunked's forward+backward needs O(T) temporary memory: at T = S = 8192 (one head,
head_dim 64, float32) at most 1/8 of plain "xla"'s, read from XLA's compiled memory analysis.
Compile only (no run), a few seconds on CPU; `python -m kernels.attention.bench --memory`
prints the same numbers (measured: 1024 MiB vs 7-11 MiB, about 1/100)."""
from llmx_kernels.attention.bench import compiled_temp_bytes


def test_chunked_temp_memory_is_under_an_eighth_of_xla():
  xla = compiled_temp_bytes("xla", seq_len=8192, head_dim=64)
  chunked = compiled_temp_bytes("xla_chunked", seq_len=8192, head_dim=64)
  assert xla >= 8192 * 8192 * 4  # the [T, S] float32 logits, at least once
  assert chunked * 8 <= xla, (chunked, xla)

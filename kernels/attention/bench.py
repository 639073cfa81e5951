"""Attention benchmark: time, TFLOP/s and percent of peak per implementation, plus memory.

  python -m kernels.attention.bench                      # the table (GPU: 512..16k; CPU: short)
  python -m kernels.attention.bench --memory             # 8192 temp memory: xla vs xla_chunked
  python -m kernels.attention.bench --impls=triton,cudnn --seq_lens=4096,8192 --head_dims=128

Each row times the forward and the forward+backward (``jax.vjp``) of one implementation
(compile excluded, median of ``--iters`` runs) and checks the implementation against the float32
``"xla"`` reference on one batch row and head. Shapes follow the FlashAttention papers: a fixed
token budget, ``batch = tokens / seq_len``, ``num_heads = hidden / head_dim``.

``attention_flops``, ``time_fn`` and ``compiled_temp_bytes`` are importable (a general
``kernels/bench.py`` may fold this in).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import dot_product_attention

# Dense (no sparsity) peak TFLOP/s for 16-bit matmuls by device kind; float32 is not listed
# (the column is then left empty). Override with --peak_tflops.
PEAK_TFLOPS_16BIT = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "B200": 2250.0,
    "RTX 4090": 165.0, "V100": 125.0,
}
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def visible_pairs(q_len: int, kv_len: int, causal: bool = False, window=None) -> int:
  """Number of (query, key) pairs attended: causal/window skip the rest (top-left aligned)."""
  if not causal and window is None:
    return q_len * kv_len
  left, right = (None, None) if window is None else (
      (window, window) if isinstance(window, int) else window)
  if causal:
    right = 0 if right is None else min(right, 0)
  i = np.arange(q_len)
  lo = np.zeros(q_len, np.int64) if left is None else np.maximum(i - left, 0)
  hi = np.full(q_len, kv_len - 1) if right is None else np.minimum(i + right, kv_len - 1)
  return int(np.maximum(hi - lo + 1, 0).sum())


def attention_flops(batch: int, q_len: int, kv_len: int, num_heads: int, head_dim: int, *,
                    causal: bool = False, window=None, backward: bool = False) -> float:
  """Matmul FLOPs: forward 2 matmuls (q k^T, p v) = 4 * pairs * head_dim per head; the
  backward adds 5 (recomputed s, dv, dp, dq, dk), so forward+backward = 3.5x forward."""
  fwd = 4.0 * batch * num_heads * head_dim * visible_pairs(q_len, kv_len, causal, window)
  return fwd * 3.5 if backward else fwd


def time_fn(fn, *args, iters: int = 10, warmup: int = 1) -> float:
  """Median wall seconds of ``fn(*args)`` (already jitted; first calls compile)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _fwd_bwd(impl: str, **kw):
  def f(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
        q, k, v, implementation=impl, **kw), q, k, v)
    return out, vjp(do)
  return f


def compiled_temp_bytes(impl: str, *, seq_len: int = 8192, head_dim: int = 64,
                        dtype=jnp.float32) -> int:
  """XLA's temporary memory for forward+backward, batch 1, one head (compile only)."""
  q = jax.ShapeDtypeStruct((1, seq_len, 1, head_dim), dtype)
  compiled = jax.jit(_fwd_bwd(impl)).lower(q, q, q, q).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_report(seq_len: int = 8192, head_dim: int = 64) -> float:
  xla = compiled_temp_bytes("xla", seq_len=seq_len, head_dim=head_dim)
  chunked = compiled_temp_bytes("xla_chunked", seq_len=seq_len, head_dim=head_dim)
  ratio = chunked / xla
  print(f"forward+backward temp memory, T = S = {seq_len}, 1 head, head_dim {head_dim}, "
        f"float32, backend {jax.default_backend()}:")
  print(f"  xla          {xla / 2**20:10.1f} MiB")
  print(f"  xla_chunked  {chunked / 2**20:10.1f} MiB")
  print(f"  ratio        {ratio:10.4f}  (1/{1 / ratio:.0f}; must be <= 1/8: "
        f"{'PASS' if ratio <= 1 / 8 else 'FAIL'})")
  return ratio


def _peak(device, override):
  if override:
    return override
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_TFLOPS_16BIT.items():
    if name in kind:
      return peak
  return None


def _rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1.0))


def check_against_reference(impl, q, k, v, do, causal):
  """Max relative error of out, dq, dk, dv on batch row 0, kv head 0 (and its query heads)
  against float32 "xla"."""
  g = q.shape[2] // k.shape[2]
  sl = lambda x, h: x[:1, :, :h]
  args = (sl(q, g), sl(k, 1), sl(v, 1), sl(do, g))
  got = jax.jit(_fwd_bwd(impl, is_causal=causal))(*args)
  ref = jax.jit(_fwd_bwd("xla", is_causal=causal))(*(x.astype(jnp.float32) for x in args))
  return max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))


def run_table(impls, seq_lens, head_dims, causals, dtype, tokens, hidden, kv_heads_ratio,
              iters, peak_override, check=True):
  device = jax.devices()[0]
  peak = _peak(device, peak_override) if jnp.dtype(dtype).itemsize == 2 else peak_override
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"dtype {dtype}, {tokens} tokens per batch, hidden {hidden}"
        + (f", peak {peak:.0f} TFLOP/s" if peak else ", peak unknown"))
  header = (f"{'impl':<12} {'seq':>6} {'hd':>4} {'causal':>6} {'batch':>5} {'heads':>5} "
            f"{'fwd ms':>9} {'fwd TF/s':>9} {'fwd %pk':>7} {'f+b ms':>9} {'f+b TF/s':>9} "
            f"{'f+b %pk':>7} {'max err':>8} {'check':>5}")
  print(header)
  print("-" * len(header))
  rows = []
  for hd in head_dims:
    for seq in seq_lens:
      for causal in causals:
        batch = max(1, tokens // seq)
        heads = max(1, hidden // hd)
        kv_heads = max(1, heads // kv_heads_ratio)
        keys = jax.random.split(jax.random.PRNGKey(seq + hd), 4)
        q = jax.random.normal(keys[0], (batch, seq, heads, hd), dtype)
        k = jax.random.normal(keys[1], (batch, seq, kv_heads, hd), dtype)
        v = jax.random.normal(keys[2], (batch, seq, kv_heads, hd), dtype)
        do = jax.random.normal(keys[3], (batch, seq, heads, hd), dtype)
        for impl in impls:
          try:
            fwd = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(
                q, k, v, is_causal=causal, implementation=impl))
            t_fwd = time_fn(fwd, q, k, v, iters=iters)
            t_all = time_fn(jax.jit(_fwd_bwd(impl, is_causal=causal)), q, k, v, do,
                            iters=iters)
            err = check_against_reference(impl, q, k, v, do, causal) if check else float("nan")
          except Exception as e:  # noqa: BLE001 - a row that cannot run says why
            print(f"{impl:<12} {seq:>6} {hd:>4} {str(causal):>6} {batch:>5} {heads:>5}  "
                  f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
            continue
          f_fwd = attention_flops(batch, seq, seq, heads, hd, causal=causal) / t_fwd / 1e12
          f_all = attention_flops(batch, seq, seq, heads, hd, causal=causal,
                                  backward=True) / t_all / 1e12
          pk = lambda f: f"{100 * f / peak:6.1f}%" if peak else f"{'-':>7}"
          ok = err <= TOLERANCE[jnp.dtype(dtype).name] if check else True
          print(f"{impl:<12} {seq:>6} {hd:>4} {str(causal):>6} {batch:>5} {heads:>5} "
                f"{t_fwd * 1e3:9.2f} {f_fwd:9.3f} {pk(f_fwd)} {t_all * 1e3:9.2f} "
                f"{f_all:9.3f} {pk(f_all)} {err:8.1e} {'ok' if ok else 'FAIL':>5}",
                flush=True)
          rows.append(dict(impl=impl, seq=seq, head_dim=hd, causal=causal, fwd_s=t_fwd,
                           fwd_bwd_s=t_all, err=err, ok=ok))
  return rows


def main(argv=None):
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--memory", action="store_true",
                 help="print the 8192 xla vs xla_chunked temp-memory comparison and exit")
  p.add_argument("--impls", default="xla,xla_chunked,triton,cudnn" if on_gpu
                 else "xla,xla_chunked")
  p.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384" if on_gpu
                 else "512,1024,2048")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--causal", default="false,true", help="comma list of false/true")
  p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32",
                 help="bfloat16 on GPU; float32 on CPU (XLA:CPU emulates bf16 matmuls)")
  p.add_argument("--tokens", type=int, default=16384 if on_gpu else 2048,
                 help="batch * seq_len per row")
  p.add_argument("--hidden", type=int, default=2048 if on_gpu else 128,
                 help="num_heads * head_dim")
  p.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
  p.add_argument("--iters", type=int, default=10 if on_gpu else 3)
  p.add_argument("--peak_tflops", type=float, default=None)
  p.add_argument("--no_check", action="store_true")
  a = p.parse_args(argv)
  if a.memory:
    ratio = memory_report()
    return 0 if ratio <= 1 / 8 else 1
  rows = run_table(
      a.impls.split(","), [int(s) for s in a.seq_lens.split(",")],
      [int(h) for h in a.head_dims.split(",")],
      [c.strip().lower() == "true" for c in a.causal.split(",")], jnp.dtype(a.dtype),
      a.tokens, a.hidden, a.gqa, a.iters, a.peak_tflops, check=not a.no_check)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())

"""Attention benchmark: time, TFLOP/s and percent of peak per implementation, plus memory.

  python -m kernels.attention.bench                      # the table (GPU: 512..16k; CPU: short)
  python -m kernels.attention.bench --memory             # 8192 temp memory: xla vs xla_chunked
  python -m kernels.attention.bench --impls=triton,cudnn --seq_lens=4096,8192 --head_dims=128

Each row times the forward and the forward+backward (``jax.vjp``) of one implementation
(compile excluded, median of ``--iters`` runs) and checks the implementation against the float32
``"xla"`` reference on one batch row and head. Shapes follow the FlashAttention papers: a fixed
token budget, ``batch = tokens / seq_len``, ``num_heads = hidden / head_dim``.

Its own table, printed row by row as the (long, on a GPU) sweep goes, over the shared harness
of ``python -m kernels.bench`` (timing, error, compiled memory, device peaks: ``kernels/bench/``)
and attention's FLOP count (``bench_spec.attention_flops``). ``compiled_temp_bytes`` is
importable (the memory test uses it).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp

from . import dot_product_attention
from ..bench import roofline, timing
from .bench_spec import attention_flops

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _median_time(fn, *args, iters: int) -> float:
  """Median wall seconds of ``fn(*args)`` (already jitted; the warm-up call compiles)."""
  return statistics.median(timing.time_fn(fn, args, warmup=1, reps=iters))


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
  temp = timing.compiled_temp_bytes(jax.jit(_fwd_bwd(impl)), q, q, q, q)
  if temp is None:
    raise RuntimeError(f"no compiled memory analysis for {impl} on {jax.default_backend()}")
  return temp


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


def _peak(device, dtype, override):
  """16-bit matmul peak TFLOP/s of ``device`` (``kernels/bench/roofline.py``); float32 gets
  none (the column is then left empty): its kernels run at full float32 precision, not TF32.
  ``--peak_tflops`` overrides."""
  if override:
    return override
  if jnp.dtype(dtype).itemsize != 2:
    return None
  return roofline.peak_tflops(roofline.lookup(getattr(device, "device_kind", "")), dtype)


def check_against_reference(impl, q, k, v, do, causal):
  """Max relative error of out, dq, dk, dv on batch row 0, kv head 0 (and its query heads)
  against float32 "xla"."""
  g = q.shape[2] // k.shape[2]
  sl = lambda x, h: x[:1, :, :h]
  args = (sl(q, g), sl(k, 1), sl(v, 1), sl(do, g))
  got = jax.jit(_fwd_bwd(impl, is_causal=causal))(*args)
  ref = jax.jit(_fwd_bwd("xla", is_causal=causal))(*(x.astype(jnp.float32) for x in args))
  return timing.max_errors(got, ref, floor=1.0)[1]


def run_table(impls, seq_lens, head_dims, causals, dtype, tokens, hidden, kv_heads_ratio,
              iters, peak_override, check=True):
  device = jax.devices()[0]
  peak = _peak(device, dtype, peak_override)
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
            t_fwd = _median_time(fwd, q, k, v, iters=iters)
            t_all = _median_time(jax.jit(_fwd_bwd(impl, is_causal=causal)), q, k, v, do,
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

"""Optional deeper GPU-less check: compile the Triton kernels all the way to an sm_90 cubin.

  pip install triton            # pip's triton carries ptxas; only this check needs it
  python -m kernels.attention.cubin_check

The CI lowering tests stop at the Triton IR that Pallas embeds in the exported module. This
script captures that IR while exporting forward+backward for a few shapes, compiles each
kernel with pip's ``triton.compile`` for ``cuda:90`` with the kernel's own num_warps and
num_stages, and prints the shared memory each needs (the 99 KiB of consumer GPUs is the
tightest limit; A100 has 163 KiB, H100 227 KiB). It reaches into a private JAX module to
capture the IR, so it is a developer tool, not a test.
"""
from __future__ import annotations

import re
import sys
import tempfile

import jax
import jax.numpy as jnp

from . import dot_product_attention
from ..triton_common import TRITON_CUSTOM_CALL, lower_for_cuda

SHAPES = [  # (B, T, S, N, K, D, dtype, kwargs)
    (2, 1024, 1024, 4, 4, 64, jnp.bfloat16, dict(is_causal=True)),
    (2, 1024, 1024, 4, 4, 128, jnp.bfloat16, {}),
    (2, 1024, 1024, 8, 2, 96, jnp.bfloat16, dict(is_causal=True)),
    (1, 512, 512, 4, 1, 256, jnp.float16, dict(is_causal=True)),
    (2, 1024, 1024, 4, 4, 128, jnp.float32, dict(is_causal=True)),
]


def capture_kernels():
  """[(name, triton_ir_text, num_warps, num_stages)] for forward+backward of SHAPES."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  captured, texts = [], []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    captured.append((jaxpr.debug_info.func_name, result.module.operation.get_asm()))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    for b, t, s, n, k, d, dtype, kw in SHAPES:
      q = jax.ShapeDtypeStruct((b, t, n, d), dtype)
      kv = jax.ShapeDtypeStruct((b, s, k, d), dtype)

      def grads(q, k, v, kw=kw):
        f = lambda q, k, v: dot_product_attention(q, k, v, implementation="triton", **kw)
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2))(q, k, v)

      texts.append(lower_for_cuda(grads, q, kv, kv, device_kind="NVIDIA H100"))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  params = []
  for text in texts:
    for line in text.splitlines():
      if f"@{TRITON_CUSTOM_CALL}(" in line:
        params.append((re.search(r'name = "(\w+)"', line).group(1),
                       int(re.search(r"num_warps = (\d+)", line).group(1)),
                       int(re.search(r"num_stages = (\d+)", line).group(1))))
  assert [c[0] for c in captured] == [p[0] for p in params], (captured, params)
  return [(name, ir, warps, stages) for (name, ir), (_, warps, stages) in zip(captured, params)]


def main() -> int:
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError:
    print("needs pip's triton package: pip install triton")
    return 2
  failures = 0
  for name, ir, warps, stages in capture_kernels():
    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
      f.write(ir)
    try:
      kernel = triton.compile(f.name, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
      print(f"ok    {name:<24} warps {warps} stages {stages} shared "
            f"{kernel.metadata.shared / 1024:6.1f} KiB")
    except Exception as e:  # noqa: BLE001 - report every kernel
      failures += 1
      print(f"FAIL  {name:<24} {type(e).__name__}: {str(e)[:300]}")
  print(f"triton {triton.__version__}, jax {jax.__version__}: {failures} failures")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

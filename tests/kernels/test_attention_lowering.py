"""implementation="triton" lowers for CUDA on a CPU-only machine, forward and backward.

CI has no GPU: exporting with ``platforms=["cuda"]`` runs the Pallas -> Triton lowering (the
Triton IR ends up in a ``__gpu$xla.gpu.triton`` custom call), which is how CI knows the kernels
compile for one. On jax >= 0.12 the export needs a pretend GPU (an abstract mesh with a GPU
abstract device), harmless on 0.10.
"""
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import llmx_kernels as kernels

TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_cuda(fn, *args):
  from jax.sharding import AbstractDevice, AbstractMesh
  mesh = AbstractMesh((1,), ("x",),
                      abstract_device=AbstractDevice("NVIDIA H100", 132, "gpu"))
  with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
    # jax >= 0.11 deprecates the Pallas Triton backend with a warning on each lowering.
    warnings.simplefilter("ignore", DeprecationWarning)
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
  return exported.mlir_module()


def kernel_names(text):
  """Names of the Triton kernels in the exported module, in order."""
  calls = [line for line in text.splitlines() if f"@{TRITON_CALL}(" in line]
  return [m for line in calls for m in re.findall(r'name = "(\w+)"', line)]


CASES = {
    "bf16_causal_mha_d64": dict(shape=(2, 256, 256, 4, 4, 64), dtype=jnp.bfloat16,
                                kw=dict(is_causal=True)),
    # Everything at once: ragged T != S, head_dim 80 (padded to 128), 3 query heads per kv
    # head, bias (with its gradient), mask, segment ids, window, soft cap, float32.
    "f32_ragged_gqa_d80_all_features": dict(
        shape=(2, 100, 257, 6, 2, 80), dtype=jnp.float32, bias=(1, 6, 100, 257),
        mask=(2, 1, 1, 257), segments=True,
        kw=dict(local_window_size=(17, 5), logits_soft_cap=30.0)),
    "f16_mqa_d256_causal_window": dict(shape=(1, 512, 512, 4, 1, 256), dtype=jnp.float16,
                                       kw=dict(is_causal=True, local_window_size=128)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_lowers_for_cuda(name):
  case = CASES[name]
  b, t, s, n, kh, d = case["shape"]
  sds = jax.ShapeDtypeStruct
  q, kv = sds((b, t, n, d), case["dtype"]), sds((b, s, kh, d), case["dtype"])
  bias = sds(case["bias"], jnp.float32) if "bias" in case else None
  mask = sds(case["mask"], jnp.bool_) if "mask" in case else None
  seg_q = sds((b, t), jnp.int32) if case.get("segments") else None
  seg_kv = sds((b, s), jnp.int32) if case.get("segments") else None

  def forward(q, k, v, bias, mask, seg_q, seg_kv):
    return kernels.dot_product_attention(
        q, k, v, bias, mask, query_segment_ids=seg_q, kv_segment_ids=seg_kv,
        implementation="triton", **case["kw"])

  def backward(q, k, v, bias, mask, seg_q, seg_kv):
    loss = lambda *a: jnp.sum(forward(*a, mask, seg_q, seg_kv).astype(jnp.float32) ** 2)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums)(q, k, v, bias)

  args = (q, kv, kv, bias, mask, seg_q, seg_kv)
  assert kernel_names(export_for_cuda(forward, *args)) == ["flash_attention_fwd"]
  names = kernel_names(export_for_cuda(backward, *args))
  want = {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkdv"}
  if bias is not None:
    want.add("flash_attention_dbias")
  assert sorted(names) == sorted(want), names


def test_xla_chunked_has_no_triton_call():
  q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  text = export_for_cuda(lambda q, k, v: kernels.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla_chunked"), q, q, q)
  assert TRITON_CALL not in text and "stablehlo.while" in text

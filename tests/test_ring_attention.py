"""Context-parallel attention (ring and all-gather) against single-device attention.

The checks need 8 devices: they run in one child process (`python -m tests.test_ring_attention
DIR`) with XLA_FLAGS=--xla_force_host_platform_device_count=8, which writes the largest errors of
every case to DIR/errors.json; the tests read them. Local chunk lengths are odd (the zig-zag
halves of 3 and 5 tokens) so that nothing lines up with a power of two.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (mesh (data, context, tensor), batch, seq, heads, kv heads, causal, segment ids, soft
# cap, ring's query block: 4 splits the local 10 or 6 tokens (the half blocks 5 or 3) unevenly)
CASES = {
    "c8_causal_gqa_seg": ((1, 8, 1), 2, 48, 4, 2, True, True, None, 512),
    "c8_causal_gqa_seg_qblock4": ((1, 8, 1), 2, 48, 4, 2, True, True, None, 4),
    "c8_causal_mha": ((1, 8, 1), 1, 48, 2, 2, True, False, None, 512),
    "c8_full_gqa_seg": ((1, 8, 1), 2, 48, 4, 1, False, True, None, 512),
    "d2c4_causal_gqa_seg": ((2, 4, 1), 2, 40, 4, 2, True, True, None, 4),
    "d2c4_full_mha": ((2, 4, 1), 4, 40, 2, 2, False, False, None, 4),
    "d2c4_causal_softcap_seg": ((2, 4, 1), 2, 40, 4, 2, True, True, 5.0, 3),
    "c4t2_causal_gqa_seg": ((1, 4, 2), 2, 40, 4, 2, True, True, None, 512),  # heads split over tensor
}
IMPLS = ("ring", "all_gather")


def _segments(rng, batch, seq):
  """Packed-row segment ids: a few documents per row, a padding tail (id 0) in the last row."""
  seg = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
    seg[b] = 1 + np.searchsorted(cuts, np.arange(seq), side="right")
  seg[-1, -5:] = 0
  return seg


def child(out_dir):
  import jax
  import jax.numpy as jnp
  import llmx_kernels as kernels
  from llmx.nn import context
  from llmx.train.mesh import BATCH_AXES, make_mesh

  assert jax.device_count() == 8, jax.devices()
  errors = {}
  for name, (shape, batch, seq, n, kv, causal, with_seg, cap, block) in CASES.items():
    rng = np.random.default_rng(0)
    d = 8
    q = jnp.asarray(rng.normal(size=(batch, seq, n, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, seq, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, seq, kv, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(batch, seq, n, d)), jnp.float32)
    seg = jnp.asarray(_segments(rng, batch, seq)) if with_seg else None

    def reference(q, k, v):
      return kernels.dot_product_attention(q, k, v, is_causal=causal, query_segment_ids=seg,
                                           kv_segment_ids=seg, logits_soft_cap=cap,
                                           implementation="xla")

    mesh = make_mesh(data=shape[0], context=shape[1], tensor=shape[2])
    want = reference(q, k, v)
    want_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for impl in IMPLS:
      cp = context.ContextParallel(mesh, batch_axes=BATCH_AXES, attention=impl,
                                   head_axis="tensor" if shape[2] > 1 else None,
                                   attention_impl="xla", query_block=block)
      c = cp.size

      def sharded(q, k, v):
        lay = lambda x: None if x is None else context.to_layout(x, c)
        out = context.attention(lay(q), lay(k), lay(v), lay(seg), cp, is_causal=causal,
                                logits_soft_cap=cap)
        return context.from_layout(out, c)

      got = jax.jit(sharded)(q, k, v)
      grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) * w), argnums=(0, 1, 2)))(q, k, v)
      errors[f"{name}-{impl}"] = dict(
          forward=float(jnp.max(jnp.abs(got - want))),
          grads=max(float(jnp.max(jnp.abs(g - h))) for g, h in zip(grads, want_grads)),
          scale=max(float(jnp.max(jnp.abs(h))) for h in want_grads))
  with open(os.path.join(out_dir, "errors.json"), "w") as f:
    json.dump(errors, f, indent=1)


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
  out = tmp_path_factory.mktemp("ring")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-m", "tests.test_ring_attention", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "errors.json") as f:
    return json.load(f)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_context_attention_matches_single_device(errors, case, impl):
  e = errors[f"{case}-{impl}"]
  assert e["forward"] < 1e-5, e
  assert e["grads"] < 1e-5, e
  assert e["scale"] > 1e-2, e  # the gradients compared are not all zero


def test_layout_round_trip_and_zigzag():
  import jax.numpy as jnp
  from llmx.nn import context, ring_attention
  x = jnp.arange(2 * 24).reshape(2, 24)
  lay = context.to_layout(x, 3)
  assert lay.shape == (6, 8)
  # Row b * 3 + c: shard c's piece of row b; shard 1 of 3 holds chunks 1 and 4 (of 6 chunks of
  # 4 tokens) of each row.
  np.testing.assert_array_equal(lay[1], [4, 5, 6, 7, 16, 17, 18, 19])
  np.testing.assert_array_equal(lay[4], np.array([4, 5, 6, 7, 16, 17, 18, 19]) + 24)
  np.testing.assert_array_equal(context.from_layout(lay, 3), x)
  np.testing.assert_array_equal(ring_attention.zigzag_order(24, 3), lay[:3].reshape(-1))


if __name__ == "__main__":
  child(sys.argv[1])

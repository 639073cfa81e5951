"""kernels.dot_product_attention against a float64 numpy reference, forward and gradients.

The Pallas kernel runs in interpret mode and "xla_chunked" runs as is, both with small blocks
(16/32) so that several blocks and ragged tails are exercised at small shapes. Gradients are the
VJP with a random output cotangent, checked against explicit float64 formulas
(tests/kernels/attention_ref.py), not against JAX's autodiff.

Error measure: max |x - ref| / max(max |ref|, 1), per output and per gradient (the floor of 1,
the scale of the unit-normal inputs, keeps exactly-zero reference gradients, e.g. dq at S = 1,
from turning rounding noise into a huge relative error).
"""
import dataclasses
import os
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmx_kernels as kernels
from llmx_kernels import attention
from llmx_kernels.attention import common, reference, triton as attn_triton, xla_chunked
from tests.kernels.attention_ref import attention_and_grads, visible_mask

# Relative tolerances (see the module docstring). float32 is measured at ~2e-6 worst; bf16 and
# fp16 are dominated by the rounding of p and ds to the input dtype before the matmuls.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}

# Small tiles: many blocks and ragged tails at T, S ~ 100.
CHUNKED_BLOCKS = xla_chunked.BlockSizes(block_q=16, block_k=32)
TRITON_BLOCKS = attn_triton.BlockSizes(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16,
                                       block_q_dkv=16, block_k_dkv=32)
XLA_BLOCK_Q = 16
# Set ATTENTION_TEST_SEED to draw other inputs (soak runs); the default varies per case.
SEED_OFFSET = int(os.environ.get("ATTENTION_TEST_SEED", "0"))


@dataclasses.dataclass(frozen=True)
class Case:
  t: int = 37
  s: int | None = None  # None: s = t
  b: int = 2
  n: int = 2
  k: int | None = None  # None: k = n
  d: int = 32
  dtype: str = "float32"
  causal: bool = False
  window: object = None
  bias: str | None = None  # "full" [B,N,T,S] | "bcast" [1,N,1,S] | "rows" [B,1,T,S]
  mask: str | None = None  # "full" [B,N,T,S] | "bcast" [B,1,T,S] with all-hidden rows
  segments: str | None = None  # "packed" | "padded" (pad id on queries and keys)
  soft_cap: float | None = None
  scale: float | None = None
  expect_empty_rows: bool = False

  @property
  def kv_len(self):
    return self.t if self.s is None else self.s

  @property
  def kv_heads(self):
    return self.n if self.k is None else self.k


def _segment_ids(key, b, length, kind, pad_from):
  """Packed documents [0 0 0 1 1 2 ...]; "padded": positions >= pad_from get id 99."""
  cuts = jax.random.randint(key, (b, 2), 1, max(2, length))
  pos = jnp.arange(length)[None, :]
  ids = (pos >= cuts[:, :1]).astype(jnp.int32) + (pos >= cuts[:, 1:]).astype(jnp.int32)
  if kind == "padded":
    ids = jnp.where(pos >= pad_from, 99, ids)
  return ids


def make_inputs(case: Case, seed: int):
  b, t, s, n, kh, d = case.b, case.t, case.kv_len, case.n, case.kv_heads, case.d
  keys = jax.random.split(jax.random.PRNGKey(seed + SEED_OFFSET), 9)
  dt = jnp.dtype(case.dtype)
  q = jax.random.normal(keys[0], (b, t, n, d), jnp.float32).astype(dt)
  k = jax.random.normal(keys[1], (b, s, kh, d), jnp.float32).astype(dt)
  v = jax.random.normal(keys[2], (b, s, kh, d), jnp.float32).astype(dt)
  do = jax.random.normal(keys[3], (b, t, n, d), jnp.float32).astype(dt)
  bias = mask = qseg = kseg = None
  if case.bias is not None:
    shape = {"full": (b, n, t, s), "bcast": (1, n, 1, s), "rows": (b, 1, t, s)}[case.bias]
    bias = jax.random.normal(keys[4], shape, jnp.float32)
  if case.mask is not None:
    shape = {"full": (b, n, t, s), "bcast": (b, 1, t, s)}[case.mask]
    mask = jax.random.bernoulli(keys[5], 0.7, shape)
    if case.mask == "bcast":  # a few rows see nothing at all
      mask = mask.at[:, :, ::5].set(False)
  if case.segments is not None:
    # Queries beyond 3/4 of T are padding (id 99); keys beyond 2/3 of S are padding with a
    # different id (98) in the "padded" case, so padded queries see no key at all.
    qseg = _segment_ids(keys[6], b, t, case.segments, pad_from=(3 * t) // 4)
    if t == s:
      kseg = qseg
    else:
      kseg = _segment_ids(keys[7], b, s, "packed", pad_from=s)
    if case.segments == "padded":
      kseg = jnp.where(jnp.arange(s)[None, :] >= (2 * s) // 3, 98, kseg)
  return q, k, v, do, bias, mask, qseg, kseg


def fast_jit(fn):
  """jax.jit, compiled at XLA:CPU backend optimization level 0: halves the compile time that
  dominates these tests (the traced program, hence the numerics' semantics, is the same)."""
  jitted = jax.jit(fn)

  def call(*args):
    compiled = jitted.lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)

  return call


def run_impl(impl: str, case: Case, inputs):
  """(out, dq, dk, dv, dbias) from one implementation, under jax.jit."""
  q, k, v, do, bias, mask, qseg, kseg = inputs
  scale = case.d ** -0.5 if case.scale is None else case.scale
  kw = dict(scale=scale, window=common.make_window(case.causal, case.window),
            soft_cap=case.soft_cap)
  if impl == "xla":
    fn = lambda q, k, v, bias: reference.attention(q, k, v, bias, mask, qseg, kseg, **kw)
  elif impl == "xla_blocked":  # the reference's causal/window query blocks, small
    fn = lambda q, k, v, bias: reference.attention(
        q, k, v, bias, mask, qseg, kseg, block_q=XLA_BLOCK_Q, **kw)
  elif impl == "xla_chunked":
    fn = lambda q, k, v, bias: xla_chunked.attention(
        q, k, v, bias, mask, qseg, kseg, block_sizes=CHUNKED_BLOCKS, **kw)
  else:
    fn = lambda q, k, v, bias: attn_triton.attention(
        q, k, v, bias, mask, qseg, kseg, block_sizes=TRITON_BLOCKS, interpret=True, **kw)

  @fast_jit
  def fwd_bwd(q, k, v, bias, do):
    out, vjp = jax.vjp(fn, q, k, v, bias)
    return (out,) + vjp(do)

  return fwd_bwd(q, k, v, bias, do)


def reference_result(case: Case, inputs):
  q, k, v, do, bias, mask, qseg, kseg = inputs
  return attention_and_grads(
      q, k, v, do, bias=bias, mask=mask, scale=case.scale, causal=case.causal,
      window=case.window, q_seg=qseg, kv_seg=kseg, soft_cap=case.soft_cap)


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1.0))


def check(impl: str, case: Case, seed: int):
  inputs = make_inputs(case, seed)
  got = run_impl(impl, case, inputs)
  want = reference_result(case, inputs)
  tol = TOLERANCE[case.dtype]
  names = ("out", "dq", "dk", "dv", "dbias")
  q, k, v = inputs[:3]
  for name, x, r, like in zip(names, got, want, (q, q, k, v, inputs[4])):
    if r is None:
      assert x is None
      continue
    assert x.shape == r.shape and x.dtype == like.dtype, (name, x.shape, x.dtype)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name} has NaN/inf"
    err = rel_err(x, r)
    assert err <= tol, f"{impl} {name}: relative error {err:.2e} > {tol:.0e} for {case}"
  # Query rows that see no key at all: exactly zero output and dq (never NaN).
  _, _, _, _, _, mask, qseg, kseg = inputs
  visible = visible_mask(case.b, case.n, case.t, case.kv_len, causal=case.causal,
                         window=case.window, mask=mask, q_seg=qseg, kv_seg=kseg)
  empty = ~visible.any(-1).transpose(0, 2, 1)  # [B, T, N]
  if case.expect_empty_rows:
    assert empty.any(), f"{case} was meant to have rows with no visible key"
  assert np.all(np.asarray(got[0], np.float32)[empty] == 0.0)
  assert np.all(np.asarray(got[1], np.float32)[empty] == 0.0)
  return inputs, got, want


def _seed(name: str) -> int:
  return zlib.crc32(name.encode()) % 100_000


# Each feature and each odd size, not the full product (compiles dominate the test time, so
# features share cases). ids name what a case covers.
SWEEP = {
    "T1_causal_window": Case(t=1, causal=True, window=3),
    "T33_S1": Case(t=33, s=1),
    "T7_causal_gqa": Case(t=7, n=4, k=2, causal=True),
    "T100_causal_segments_packed": Case(t=100, causal=True, segments="packed"),
    "T257_head_dim_64": Case(t=257, b=1, n=1, d=64),
    "T257_causal": Case(t=257, b=1, n=1, causal=True),
    "T100_S257": Case(t=100, s=257, b=1),
    "T257_S100_causal": Case(t=257, s=100, b=1, causal=True),
    "segments_padded_empty_rows_mqa": Case(t=57, s=80, n=4, k=1, segments="padded",
                                           expect_empty_rows=True),
    "gqa_3_groups_window_causal": Case(t=50, n=6, k=2, causal=True, window=16),
    "window_left_right_soft_cap": Case(t=100, window=(9, 4), soft_cap=2.0),
    "window_T_ne_S": Case(t=70, s=45, window=(40, 2)),
    "bias_full_soft_cap_gqa": Case(t=45, s=53, n=4, k=2, bias="full", soft_cap=5.0),
    "bias_bcast_mask_bcast_empty_rows": Case(t=45, s=53, n=4, k=2, bias="bcast", mask="bcast",
                                             expect_empty_rows=True),
    "bias_rows_causal_scale": Case(t=40, bias="rows", causal=True, scale=0.3),
    "mask_full_segments_padded": Case(t=40, mask="full", segments="padded"),
    "head_dim_80": Case(t=40, d=80),
    "head_dim_96_causal": Case(t=40, d=96, causal=True),
    "head_dim_128": Case(t=24, d=128, b=1),
    "head_dim_256": Case(t=24, d=256, b=1, n=1),
}
DTYPE_SWEEP = {
    f"{dtype}_{name}": dataclasses.replace(case, dtype=dtype)
    for dtype in ("bfloat16", "float16")
    for name, case in (("causal_gqa", Case(t=100, n=4, k=2, causal=True)),
                       ("segments_padded_bias", Case(t=57, s=80, segments="padded",
                                                     bias="full")),
                       ("head_dim_80_window_soft_cap", Case(t=33, d=80, window=(8, 8),
                                                            soft_cap=3.0)))
}
# The reference implementation is checked too, on the features it implements by hand.
XLA_SWEEP = ("T1_causal_window", "T100_S257", "segments_padded_empty_rows_mqa",
             "gqa_3_groups_window_causal", "bias_full_soft_cap_gqa",
             "bias_bcast_mask_bcast_empty_rows", "mask_full_segments_padded")


@pytest.mark.parametrize("impl", ["xla_chunked", "triton"])
@pytest.mark.parametrize("name", list(SWEEP))
def test_sweep(impl, name):
  check(impl, SWEEP[name], _seed(name))


@pytest.mark.parametrize("impl", ["xla_chunked", "triton"])
@pytest.mark.parametrize("name", list(DTYPE_SWEEP))
def test_dtypes(impl, name):
  check(impl, DTYPE_SWEEP[name], _seed(name))


@pytest.mark.parametrize("name", XLA_SWEEP)
def test_xla_reference(name):
  check("xla", SWEEP[name], _seed(name) + 1)
  check("xla", dataclasses.replace(SWEEP[name], dtype="bfloat16"), _seed(name) + 2)


# Causal and windowed cases, where the reference splits the queries into blocks (one case with
# every kind of bias, mask and segment ids sliced per block).
XLA_BLOCKED_SWEEP = {
    name: SWEEP[name] for name in (
        "T7_causal_gqa", "T100_causal_segments_packed", "T257_S100_causal",
        "gqa_3_groups_window_causal", "window_left_right_soft_cap", "window_T_ne_S",
        "bias_rows_causal_scale")} | {
    "causal_gqa_bias_full_mask_bcast_segments_padded": Case(
        t=45, s=53, n=4, k=2, causal=True, bias="full", mask="bcast", segments="padded",
        expect_empty_rows=True),
    "window_hides_every_key_from_late_queries": Case(t=70, s=20, window=(10, 0),
                                                      expect_empty_rows=True),
}


@pytest.mark.parametrize("name", list(XLA_BLOCKED_SWEEP))
def test_xla_reference_query_blocks(name):
  check("xla_blocked", XLA_BLOCKED_SWEEP[name], _seed(name) + 3)


def test_xla_reference_block_q_validated():
  q, k, v = _qkv(t=20)
  for bad in (0, -4, 2.5):
    with pytest.raises(ValueError, match=f"block_q={bad}: must be an integer >= 1"):
      reference.attention(q, k, v, scale=0.125, window=common.make_window(True, None),
                          block_q=bad)


@pytest.mark.parametrize("impl", ["xla_chunked", "triton", "xla_blocked"])
def test_hidden_blocks_are_skipped(impl):
  """NaN in blocks that the causal window hides entirely must not reach any result.

  Masking-and-discarding would multiply the hidden NaN values by zero probabilities (NaN); a
  kernel that never visits those blocks stays finite. T = S = 96, blocks of 16 or 32, causal
  window of 16; q, k, v and the output cotangent are NaN from position 64 on.
  """
  t, d = 96, 32
  keys = jax.random.split(jax.random.PRNGKey(11), 4)
  q, k, v, do = (jax.random.normal(kk, (1, t, 1, d)).at[:, 64:].set(jnp.nan) for kk in keys)
  out, dq, dk, dv, _ = run_impl(impl, Case(t=t, b=1, n=1, causal=True, window=16),
                                (q, k, v, do, None, None, None, None))
  out, dq, dk, dv = (np.asarray(x) for x in (out, dq, dk, dv))
  # Forward and dq: queries < 64 never visit key blocks >= 64.
  assert np.all(np.isfinite(out[:, :64])) and np.all(np.isfinite(dq[:, :64]))
  # dk/dv: keys < 32 are seen by queries < 48 only, so query blocks >= 64 are skipped.
  assert np.all(np.isfinite(dk[:, :32])) and np.all(np.isfinite(dv[:, :32]))
  # And the NaN does reach the rows that see it (the test can fail).
  assert np.all(np.isnan(out[:, 64:])) and np.all(np.isnan(dk[:, 64:]))


# --- The public op: dispatch, transformations ------------------------------------------------

def _qkv(b=2, t=24, s=None, n=4, k=2, d=32, seed=0, dtype=jnp.float32):
  s = t if s is None else s
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, d), dtype),
          jax.random.normal(keys[1], (b, s, k, d), dtype),
          jax.random.normal(keys[2], (b, s, k, d), dtype))


@pytest.mark.parametrize("implementation,interpret", [(None, False), ("xla_chunked", False)])
def test_public_op_matches_jax_nn(implementation, interpret):
  """Drop-in: jax.nn.dot_product_attention's numbers and gradients (q, k, v, bias) where the
  arguments overlap, through the public op under jax.jit."""
  q, k, v = _qkv(seed=3)
  bias = jax.random.normal(jax.random.PRNGKey(4), (1, 4, 24, 24))
  mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.8, (2, 1, 24, 24)) | jnp.eye(24, dtype=bool)
  kw = dict(scale=0.2, is_causal=True, local_window_size=(5, 0))

  def value_and_grads(fn):
    loss = lambda q, k, v, bias: jnp.sum(jnp.sin(fn(q, k, v, bias)))
    return fast_jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))(
        q, k, v, bias)

  want, want_grads = value_and_grads(
      lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias, mask, **kw))
  got, got_grads = value_and_grads(lambda q, k, v, bias: kernels.dot_product_attention(
      q, k, v, bias, mask, implementation=implementation, interpret=interpret, **kw))
  assert got.shape == q.shape and got.dtype == q.dtype
  assert rel_err(got, want) <= 1e-5
  for g, w in zip(got_grads, want_grads):
    assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("implementation,interpret", [("xla_chunked", False),
                                                      ("triton", True)])
def test_vmap_over_leading_axis(implementation, interpret):
  q, k, v = _qkv(b=1, t=20, n=2, k=1, seed=9)
  stack = lambda x: jnp.stack([x, -2.0 * x])  # [2, 1, T, H, D]
  qs, ks, vs = stack(q), stack(k), stack(v)

  def fwd_and_grad(impl, interp):
    f = jax.vmap(lambda q, k, v: kernels.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl, interpret=interp))
    return fast_jit(lambda q, k, v: (f(q, k, v), jax.grad(
        lambda q: jnp.sum(f(q, k, v) ** 2))(q)))(qs, ks, vs)

  got, got_grad = fwd_and_grad(implementation, interpret)
  want, want_grad = fwd_and_grad("xla", False)
  assert rel_err(got, want) <= 1e-5 and rel_err(got_grad, want_grad) <= 1e-5


@pytest.mark.parametrize("implementation,interpret", [("xla_chunked", False),
                                                      ("triton", True)])
def test_shard_map(implementation, interpret):
  from jax.sharding import Mesh, PartitionSpec as P
  try:
    from jax import shard_map
  except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  q, k, v = _qkv(seed=10)
  seg = jnp.array([[0] * 10 + [1] * 14, [0] * 24], jnp.int32)
  f = lambda q, k, v, seg: kernels.dot_product_attention(
      q, k, v, is_causal=True, query_segment_ids=seg, kv_segment_ids=seg,
      implementation=implementation, interpret=interpret)
  sharded = shard_map(f, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))
  out, grad = fast_jit(lambda q: (sharded(q, k, v, seg), jax.grad(
      lambda q: jnp.sum(sharded(q, k, v, seg) ** 2))(q)))(q)
  want = kernels.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=seg,
                                       implementation="xla")
  assert rel_err(out, want) <= 1e-5
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def _args(**kw):
  base = dict(batch=1, q_len=128, kv_len=128, num_heads=4, num_kv_heads=4, head_dim=64,
              dtype="float32", has_bias=False, has_mask=False, has_segment_ids=False,
              window=common.Window(), soft_cap=None, platform="cpu")
  base.update(kw)
  return attention.AttentionArgs(**base)


def test_default_selection():
  select = attention._select
  assert select(None, _args(), False) == "xla"
  long_len = int(np.sqrt(attention.CPU_XLA_MAX_LOGITS)) * 2
  assert select(None, _args(q_len=long_len, kv_len=long_len), False) == "xla_chunked"
  # Mosaic GPU from JAX 0.11 (its API); the Triton kernels before.
  new_jax = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
  assert select(None, _args(platform="gpu", dtype="bfloat16"), False) == (
      "mosaic_gpu" if new_jax else "triton")
  assert select(None, _args(platform="tpu"), False) == "mosaic_tpu"
  attention._warned.clear()
  with pytest.warns(UserWarning, match="'mosaic_tpu' cannot serve these arguments"):
    assert select(None, _args(platform="tpu", has_bias=True), False) == "xla_chunked"
  assert select(None, _args(), True) == "triton"  # interpret: the Pallas kernel
  assert select("xla_chunked", _args(platform="gpu"), False) == "xla_chunked"


def test_gpu_fallback_warns_once():
  attention._warned.clear()
  args = _args(platform="gpu", dtype="float64")  # Triton does not take float64
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert attention._select(None, args, False) == "xla_chunked"
    assert attention._select(None, args, False) == "xla_chunked"
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and "'triton'" in messages[0] and "float64" in messages[0]
  assert "falling back to 'xla_chunked'" in messages[0]


def test_cpu_default_is_xla_and_chunked_for_long(monkeypatch):
  q, k, v = _qkv(t=40, seed=12)
  jaxpr = lambda: str(jax.make_jaxpr(lambda q, k, v: kernels.dot_product_attention(
      q, k, v, is_causal=True))(q, k, v))
  assert "while" not in jaxpr()  # short: "xla", the [T, S] logits
  monkeypatch.setattr(attention, "CPU_XLA_MAX_LOGITS", 40 * 40 - 1)
  assert "while" in jaxpr()  # long: the blockwise loop


# --- Bad input ----------------------------------------------------------------------------------

def _call(q, k, v, **kw):
  return kernels.dot_product_attention(q, k, v, **kw)


def test_errors_shapes():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"query must have rank 4.*\(2, 24, 4\)"):
    _call(q[..., 0], k, v)
  with pytest.raises(ValueError, match=r"key must have rank 4"):
    _call(q, k[0], v[0])
  with pytest.raises(ValueError, match=r"batch size of query \(2\) and key/value \(1\)"):
    _call(q, k[:1], v[:1])
  with pytest.raises(ValueError, match=r"head_dim of query \(32\) and key/value \(16\)"):
    _call(q, k[..., :16], v[..., :16])
  with pytest.raises(ValueError, match=r"num_heads of query \(4\).*num_kv_heads.*\(3\)"):
    _call(q, jnp.zeros((2, 24, 3, 32)), jnp.zeros((2, 24, 3, 32)))
  with pytest.raises(ValueError, match=r"key and value must have the same shape"):
    _call(q, k, v[:, :20])
  with pytest.raises(ValueError, match=r"share one dtype.*bfloat16"):
    _call(q, k.astype(jnp.bfloat16), v)


def test_errors_optional_arguments():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"query_segment_ids must have shape \[batch, T\] = "
                                       r"\(2, 24\); got query_segment_ids shape \(2, 23\)"):
    _call(q, k, v, query_segment_ids=jnp.zeros((2, 23), jnp.int32),
          kv_segment_ids=jnp.zeros((2, 24), jnp.int32))
  with pytest.raises(ValueError, match=r"kv_segment_ids must have shape"):
    _call(q, k, v, query_segment_ids=jnp.zeros((2, 24), jnp.int32),
          kv_segment_ids=jnp.zeros((24,), jnp.int32))
  q2, k2, v2 = _qkv(t=24, s=30)
  with pytest.raises(ValueError, match=r"query_segment_ids given without the other"):
    _call(q2, k2, v2, query_segment_ids=jnp.zeros((2, 24), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids must be integers"):
    _call(q, k, v, query_segment_ids=jnp.zeros((2, 24)), kv_segment_ids=jnp.zeros((2, 24)))
  with pytest.raises(ValueError, match=r"bias must have rank 4 and broadcast to .*"
                                       r"\(2, 4, 24, 24\); got bias shape \(4, 24, 24\)"):
    _call(q, k, v, bias=jnp.zeros((4, 24, 24)))
  with pytest.raises(ValueError, match=r"mask must have rank 4.*got mask shape \(2, 3, 24, 24\)"):
    _call(q, k, v, mask=jnp.ones((2, 3, 24, 24), bool))
  with pytest.raises(ValueError, match=r"mask must be boolean"):
    _call(q, k, v, mask=jnp.ones((2, 1, 24, 24)))
  with pytest.raises(ValueError, match=r"local_window_size must be"):
    _call(q, k, v, local_window_size=(1, 2, 3))
  with pytest.raises(ValueError, match=r"local_window_size must be >= 0"):
    _call(q, k, v, local_window_size=-1)
  with pytest.raises(ValueError, match=r"logits_soft_cap must be > 0"):
    _call(q, k, v, logits_soft_cap=0.0)


def test_errors_implementation():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"implementation='flash' is not one of .*'xla_chunked'"):
    _call(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match=r"interpret=True applies to the Pallas.*'xla'"):
    _call(q, k, v, implementation="xla", interpret=True)
  q8, k8, v8 = (x.astype(jnp.float8_e4m3fn) for x in (q, k, v))
  with pytest.raises(ValueError, match=r"implementation='triton' cannot serve these arguments: "
                                       r"dtype float8_e4m3fn.*query \[2, 24, 4, 32\]"):
    _call(q8, k8, v8, implementation="triton", interpret=True)
  with pytest.raises(ValueError, match=r"implementation='triton' cannot serve.*head_dim 512"):
    _call(*_qkv(t=4, d=512), implementation="triton", interpret=True)
  with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve.*logits_soft_cap"):
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    _call(qb, kb, vb, implementation="cudnn", logits_soft_cap=5.0)
  with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve.*segment ids"):
    seg = jnp.zeros((2, 24), jnp.int32)
    _call(qb, kb, vb, implementation="cudnn", query_segment_ids=seg, kv_segment_ids=seg)


def test_triton_block_sizes_validated():
  q, k, v = _qkv(t=40)
  with pytest.raises(ValueError, match=r"BlockSizes.block_k=24 must be a power of two"):
    attn_triton.attention(q, k, v, scale=0.1, window=common.Window(), interpret=True,
                          block_sizes=attn_triton.BlockSizes(block_k=24))

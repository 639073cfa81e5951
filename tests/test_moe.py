"""Mixture of experts (llmx/nn/moe.py): dropless and capacity modes against a dense loop over the
experts, forward and gradients; expert parallelism on 8 simulated devices against 1 device; the
MoE config errors.

The 8-device check runs in a child process (`python -m tests.test_moe ep8`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, as tests/test_sharding.py does.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx.families.lm.model import GPT, GPTConfig
from llmx.nn.moe import MoE
from llmx.train.config_check import ConfigError
from tests.conftest import load_config, adamw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, HIDDEN, E, T = 16, 24, 4, 40


def reference(params, x, top_k, gating, keep=None):
  """The MoE by definition: every expert runs on every token (a loop over experts), each token's
  output is the gate-weighted sum over its top-k experts (those `keep` [T, k] allows)."""
  logits = x @ params["router"]
  scores = jax.nn.softmax(logits) if gating == "softmax" else jax.nn.sigmoid(logits)
  top, experts = jax.lax.top_k(scores, top_k)
  gates = top if (gating == "softmax" and top_k == 1) else top / top.sum(-1, keepdims=True)
  if keep is not None:
    gates = gates * keep
  y = jnp.zeros_like(x)
  for e in range(params["gate_up"].shape[0]):
    h = x @ params["gate_up"][e]
    out = (jax.nn.silu(h[:, :HIDDEN]) * h[:, HIDDEN:]) @ params["down"][e]
    y = y + (gates * (experts == e)).sum(-1)[:, None] * out
  if "shared" in params:
    s = params["shared"]
    h = x @ s["gate_up"]["kernel"]
    y = y + (jax.nn.silu(h[:, :HIDDEN]) * h[:, HIDDEN:]) @ s["down"]["kernel"]
  return y, experts


def _layer(gating="softmax", shared=False, capacity_factor=0.0, top_k=2, grouped="auto"):
  layer = MoE(D, HIDDEN, E, top_k, gating=gating, shared_hidden=HIDDEN if shared else 0,
              capacity_factor=capacity_factor, grouped=grouped, rngs=nnx.Rngs(0))
  # Larger router weights than the init's: routing far from uniform, so experts differ in load.
  layer.router[...] = jax.random.normal(jax.random.key(3), (D, E))
  return layer


def _plain(state):
  return jax.tree.map(lambda v: v, nnx.to_pure_dict(state))


X = jax.random.normal(jax.random.key(1), (T, D))
COTANGENT = jax.random.normal(jax.random.key(2), (T, D))


@pytest.mark.parametrize("gating, shared, grouped", [
    ("softmax", False, "ragged_dot"), ("sigmoid", False, "ragged_dot"),
    ("softmax", True, "ragged_dot"), ("sigmoid", True, "ragged_dot"),
    ("softmax", False, "tiled"), ("sigmoid", True, "tiled")])
def test_dropless_matches_a_dense_loop_forward_and_gradients(gating, shared, grouped):
  layer = _layer(gating, shared, grouped=grouped)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def moe_loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * COTANGENT), (y, aux)

  def ref_loss(params, x):
    y, _ = reference(_plain(params), x, 2, gating)
    return jnp.sum(y * COTANGENT), y

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(moe_loss, argnums=(0, 1), has_aux=True))(
      params, X)
  (_, y_ref), ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(
      params, X)
  errors = [float(jnp.max(jnp.abs(y - y_ref)))]
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    errors.append(float(jnp.max(jnp.abs(a - b))))
  print(f"\n{gating} shared={shared} {grouped}: max |output error| {errors[0]:.2e}, max |gradient error| "
        f"{max(errors[1:]):.2e} over {len(errors) - 1} arrays (params and input)")
  assert max(errors) < 1e-5, errors
  assert float(jnp.max(jnp.abs(grads[0]["router"]))) > 1e-3  # the router learns from the loss
  assert float(aux["dropped"]) == 0.0
  np.testing.assert_allclose(float(aux["load"].sum()), 1.0, rtol=1e-6)
  assert float(aux["aux_loss"]) >= 1.0 - 1e-6 and float(aux["z_loss"]) > 0


def _capacity_keep(experts, capacity):
  """Which (token, choice) pairs fit: choice-major priority, then token order."""
  counts, keep = np.zeros(E, int), np.zeros(experts.shape, bool)
  for j in range(experts.shape[1]):
    for t in range(experts.shape[0]):
      e = experts[t, j]
      keep[t, j] = counts[e] < capacity
      counts[e] += 1
  return keep


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_mode_drops_exactly_the_pairs_beyond_capacity(capacity_factor):
  layer = _layer(capacity_factor=capacity_factor)
  params = _plain(nnx.state(layer, nnx.Param))
  y, aux = jax.jit(lambda x: layer(x))(X)
  _, experts = reference(params, X, 2, "softmax")
  capacity = math.ceil(capacity_factor * T * 2 / E)
  keep = _capacity_keep(np.asarray(experts), capacity)
  y_ref, _ = reference(params, X, 2, "softmax", keep=jnp.asarray(keep))
  error = float(jnp.max(jnp.abs(y - y_ref)))
  print(f"\ncapacity factor {capacity_factor}: capacity {capacity}, dropped "
        f"{float(aux['dropped']):.4f} (expected {1 - keep.mean():.4f}), max |error| {error:.2e}")
  np.testing.assert_allclose(float(aux["dropped"]), 1 - keep.mean(), atol=1e-7)
  assert error < 1e-5
  if capacity_factor < 1:
    assert keep.mean() < 1  # something was dropped


def test_gpt_with_moe_layers_every_second_layer_and_decode():
  cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=4, n_head=2, d_model=16, mlp="swiglu",
                  moe_num_experts=4, moe_top_k=2, moe_every_n_layers=2, moe_hidden=8)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, False, True]
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
  loss, aux = nnx.jit(lambda m, t: m.loss(t[:, :-1], t[:, 1:], return_aux=True))(model, tokens)
  assert set(aux) == {"aux_loss", "z_loss", "load", "dropped"} and aux["load"].shape == (4,)
  assert np.isfinite(float(loss))
  # The cached decode path runs the MoE layers too and agrees with the full forward.
  h, _ = nnx.jit(lambda m, t: m.decode_step(t, jnp.arange(8)[None].repeat(2, 0),
                                             m.init_cache(2, 16)))(model, tokens[:, :-1])
  full = nnx.jit(lambda m, t: m.hidden_states(t))(model, tokens[:, :-1])
  np.testing.assert_allclose(h.reshape(16, -1), full, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(top_k=9), r"model.moe.top_k=9: must be an integer in \[1, model.moe.num_experts=8\]"),
    (dict(top_k=0), r"model.moe.top_k=0: must be an integer in \[1, "),
    (dict(gating="relu"), r"model.moe.gating='relu': must be one of 'softmax', 'sigmoid'"),
    (dict(aux_loss_weight=-0.1), r"model.moe.aux_loss_weight=-0.1: must lie in \[0.0, inf\)"),
    (dict(z_loss_weight=-1.0), r"model.moe.z_loss_weight=-1.0: must lie in \[0.0, inf\)"),
    (dict(capacity_factor=-1.0), r"model.moe.capacity_factor=-1.0: must lie in"),
    (dict(every_n_layers=0), r"model.moe.every_n_layers=0: must be an integer > 0"),
    (dict(mesh_expert=3), r"mesh.expert=3 does not divide model.moe.num_experts=8"),
])
def test_moe_config_errors(overrides, message):
  from llmx.families.lm import recipe as lm_recipe
  c = load_config("lm.py:moe_tiny")
  lm_recipe.validate(c)
  if "mesh_expert" in overrides:
    c.mesh.expert = overrides.pop("mesh_expert")
  c.model.moe.update(overrides)
  with pytest.raises(ConfigError, match=message):
    lm_recipe.validate(c)


def test_moe_tiny_has_the_dense_twins_active_parameters():
  from llmx.families.lm import recipe as lm_recipe
  from llmx.nn.params import num_params
  counts = {}
  for variant in ("moe_tiny", "moe_tiny_dense"):
    cfg = lm_recipe.model_config(load_config(f"lm.py:{variant}"), 2048)
    n = num_params(nnx.eval_shape(lambda: lm_recipe.build_model(cfg, 0)))
    counts[variant] = (n, lm_recipe.active_params(cfg, n))
  assert counts["moe_tiny"][1] == counts["moe_tiny_dense"][1] + 4 * 128 * 8  # + the routers
  assert counts["moe_tiny"][0] > 2 * counts["moe_tiny_dense"][0]


def test_expert_parallel_on_8_devices_matches_one_device():
  """20 AdamW steps of a tiny MoE LM on a data 2 x expert 4 mesh (experts split 4 ways, tokens
  exchanged by all_to_all), and on data 8 (routing per device), match the 1-device losses
  within 1e-4."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "tests.test_moe", "ep8"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  one, ep = np.array(result["1 device"]), np.array(result["data 2 x expert 4"])
  diff = float(np.max(np.abs(one - ep)))
  data8 = float(np.max(np.abs(one - np.array(result["data 8"]))))  # per-device routing, expert=1
  print(f"\nexpert=4 vs 1 device, 20 steps: max |loss difference| {diff:.2e}; losses "
        f"{one[0]:.4f} -> {one[-1]:.4f}; expert weights per device {result['gate_up_shard']}, "
        f"all_to_all in the step: {result['all_to_all']}; data 8 (no expert axis) vs 1 device "
        f"{data8:.2e}")
  assert len(one) == 20 and np.isfinite(one).all() and one[-1] < one[0]
  assert diff <= 1e-4 and data8 <= 1e-4
  assert result["gate_up_shard"][0] == 2 and result["all_to_all"]
  # The layer alone, forward and gradients: dropless with either grouped matmul equals one
  # device; capacity mode equals one device run on each device's tokens (capacity per group).
  print("layer on data 2 x expert 4 vs one device, max |error| (output, gradients):",
        result["layer"])
  for name, (out, grad) in result["layer"].items():
    assert out < 1e-5 and grad < 1e-4, name


def _child_ep8():
  from llmx.data.lm_windows import lm_batches
  from llmx.families.lm.recipe import lm_loss
  from llmx.train.mesh import batch_sharding, global_batch, make_mesh, replicated
  from llmx.train.sharding import state_shardings
  from llmx.train.step import supervised
  assert jax.device_count() == 8, jax.devices()
  cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=32, mlp="swiglu",
                  positions="rope", norm="rmsnorm", bias=False, moe_num_experts=8, moe_top_k=2,
                  moe_hidden=32)
  # A repeating 97-token text: learnable, so the 20 steps move the loss.
  tokens = np.tile(np.random.default_rng(0).integers(0, 32, 97), 200).astype(np.int32)
  data = lm_batches(tokens, block_size=16, batch_size=16, seed=0)
  out = {"layer": _layer_errors(make_mesh(data=2, expert=4))}
  for name, mesh in (("1 device", make_mesh(devices=jax.devices()[:1])),
                     ("data 2 x expert 4", make_mesh(data=2, expert=4)),
                     ("data 8", make_mesh(data=8))):
    model_mesh = mesh if mesh.size > 1 else None  # as the recipe passes it
    build = lambda: GPT(cfg, rngs=nnx.Rngs(params=0, dropout=1), mesh=model_mesh)
    trainable = supervised(build, adamw(1e-3), lm_loss)
    shardings = state_shardings(jax.eval_shape(trainable.init), mesh)
    state = jax.jit(trainable.init, out_shardings=shardings)()
    step = jax.jit(trainable.train_step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)))
    if mesh.shape["expert"] > 1:
      kernel = state["params"]["blocks"][0]["mlp"]["gate_up"]
      out["gate_up_shard"] = list(kernel.addressable_shards[0].data.shape)
      batch = global_batch(data[0], batch_sharding(mesh))
      out["all_to_all"] = "all-to-all" in step.lower(state, batch).compile().as_text()
    losses = []
    for i in range(20):
      state, metrics = step(state, global_batch(data[i], batch_sharding(mesh)))
      losses.append(float(metrics["train_loss"]))
    out[name] = losses
  print(json.dumps(out))


def _layer_errors(mesh):
  from llmx.nn.moe import experts_local, run_experts
  t, d, h, e, k = 128, 8, 6, 8, 2
  x = jax.random.normal(jax.random.key(0), (t, d))
  gates, experts = jax.lax.top_k(jax.nn.softmax(jax.random.normal(jax.random.key(1), (t, e))), k)
  w1 = jax.random.normal(jax.random.key(2), (e, d, 2 * h)) / 3
  w2 = jax.random.normal(jax.random.key(3), (e, h, d)) / 3
  cot = jax.random.normal(jax.random.key(4), (t, d))
  errors = {}
  for name, cf, grouped in (("dropless ragged_dot", 0.0, "ragged_dot"),
                            ("dropless tiled", 0.0, "tiled"), ("capacity 1.0", 1.0, "tiled")):
    def sharded(x, w1, w2, gates):
      return run_experts(x, experts, gates, w1, w2, capacity_factor=cf, grouped=grouped,
                         mesh=mesh)[0]
    def local(x, w1, w2, gates):  # the 8 devices' token groups, one after another
      groups = [experts_local(x.reshape(8, t // 8, d)[i],
                              experts.reshape(8, t // 8, k)[i], gates.reshape(8, t // 8, k)[i],
                              w1, w2, cf, grouped)[0] for i in range(8)]
      return jnp.concatenate(groups)
    results = [jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3)))(
        x, w1, w2, gates) for f in (sharded, local)]
    outs = [jax.jit(f)(x, w1, w2, gates) for f in (sharded, local)]
    grad_error = max(float(jnp.max(jnp.abs(a - b)))
                     for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])))
    errors[name] = (float(jnp.max(jnp.abs(outs[0] - outs[1]))), grad_error)
  return errors


if __name__ == "__main__":
  if sys.argv[1] == "ep8":
    _child_ep8()

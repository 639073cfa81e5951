"""model.matmul_dtype="bfloat16": dense layers' matmuls on bf16 inputs, float32 everywhere else."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmx.families.lm.model import GPT, GPTConfig
from llmx.nn.precision import dot_general, rounded_matmul, transposed


def _bf16_as_f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("x_shape, n", [((37, 19), 23), ((3, 5, 41), 7), ((1, 129), 65)])
def test_rounded_matmul_value_and_gradients_against_float64(x_shape, n):
  """The product of the bf16-rounded operands, accumulated exactly enough for float32; the
  gradients are the float64 matmuls of the rounded incoming gradient and rounded operands."""
  kx, kw, kg = jax.random.split(jax.random.key(sum(x_shape) + n), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, (x_shape[-1], n), jnp.float32)
  g = jax.random.normal(kg, (*x_shape[:-1], n), jnp.float32)
  y, vjp = jax.vjp(lambda x, w: rounded_matmul(x, w, jnp.bfloat16), x, w)
  dx, dw = vjp(g)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
  assert dx.shape == x.shape and dw.shape == w.shape
  xr, wr, gr = _bf16_as_f64(x), _bf16_as_f64(w), _bf16_as_f64(g)
  k = x_shape[-1]
  xr2, gr2 = xr.reshape(-1, k), gr.reshape(-1, n)

  def close(actual, a, b):  # float32 accumulation: error within eps * terms * sum |a_i b_i|
    bound = 2 * np.finfo(np.float32).eps * a.shape[1] * (np.abs(a) @ np.abs(b)) + 1e-30
    assert np.all(np.abs(np.asarray(actual, np.float64).reshape(bound.shape) - a @ b) <= bound)

  close(y, xr2, wr)
  close(dx, gr2, wr.T)
  close(dw, xr2.T, gr2)
  # Rounding is real: against unrounded float64 the error is bf16-sized, not float32-sized.
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert 1e-4 < np.abs(np.asarray(y) - exact).max() / np.abs(exact).max() < 2e-2


def _dot_operand_dtypes(fn, *args):
  """-> the operand dtypes of each dot in the compiled HLO of fn(*args)."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  found = []
  for line in hlo.splitlines():
    if " dot(" in line:
      body = hlo[:hlo.index(line)]
      names = line.split(" dot(")[1].split(")")[0].split(", ")
      found.append(tuple(body[body.rindex(f"{name} = "):].split(" = ")[1].split("[")[0]
                         for name in names))
  return found


def test_transposed_is_a_transpose_the_compiler_keeps():
  x = jax.random.normal(jax.random.key(0), (13, 7))
  np.testing.assert_array_equal(transposed(x), x.T)
  w = jax.random.normal(jax.random.key(1), (7, 5))
  # Where this machine's XLA runs a plain bf16 matmul in bf16, the backward's two do as well
  # (a transpose folded into the matmul would have them upcast to float32).
  plain = _dot_operand_dtypes(
      lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                           preferred_element_type=jnp.float32), x, w)
  grads = _dot_operand_dtypes(
      jax.grad(lambda x, w: (rounded_matmul(x, w, jnp.bfloat16) ** 2).sum(), (0, 1)), x, w)
  assert len(plain) == 1 and len(grads) == 3
  assert grads == plain * 3, grads


def test_dot_general_errors_and_float32_is_plain():
  assert dot_general("float32") is jax.lax.dot_general
  assert dot_general("bfloat16") is dot_general("bfloat16")
  with pytest.raises(ValueError, match=r"matmul_dtype='float16': must be one of 'float32', "
                                       r"'bfloat16'"):
    dot_general("float16")
  with pytest.raises(ValueError, match=r"serves x\[..., k\] @ w\[k, n\]"):
    dot_general("bfloat16")(jnp.ones((3, 4)), jnp.ones((5, 4)), (((1,), (1,)), ((), ())))
  with pytest.raises(ValueError, match=r"matmul_dtype='fp8': must be one of"):
    GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=16, matmul_dtype="fp8")


def _gpt(matmul_dtype, **kw):
  c = GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, d_model=32,
                matmul_dtype=matmul_dtype, **kw)
  return GPT(c, rngs=nnx.Rngs(params=0, dropout=1))


@pytest.mark.parametrize("extra", [{}, dict(mlp="swiglu", norm="rmsnorm", positions="rope",
                                            n_kv_head=1)])
def test_bf16_matmul_gpt_is_close_to_float32_and_trains_as_well(extra):
  """Same parameters: logits within bf16 rounding of the float32 model's, parameters stay
  float32; 60 Adam steps on one batch bring both losses down alike."""
  tokens = jax.random.randint(jax.random.key(1), (3, 17), 0, 37)
  targets = jnp.roll(tokens, -1, axis=1)
  models = {d: _gpt(d, **extra) for d in ("float32", "bfloat16")}
  logits = {d: m(tokens) for d, m in models.items()}
  assert logits["bfloat16"].dtype == jnp.float32
  err = np.abs(logits["bfloat16"] - logits["float32"]).max()
  assert 1e-5 < err < 5e-2 * np.abs(logits["float32"]).max()
  losses = {}
  for d, model in models.items():
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      loss, grads = nnx.value_and_grad(lambda m: m.loss(tokens, targets))(model)
      opt.update(model, grads)
      return loss

    losses[d] = [float(step(model, opt)) for _ in range(60)]
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in leaves)
  first, last = losses["float32"][0], losses["float32"][-1]
  assert last < 0.5 * first
  assert abs(losses["bfloat16"][-1] - last) < 0.05 * first

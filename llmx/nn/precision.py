"""Matmuls with bfloat16 inputs and float32 accumulation: a model's `matmul_dtype`.

With matmul_dtype="bfloat16" the dense layers round their input and weight to bfloat16 and
accumulate the products in float32 (what a TPU does for a float32 matmul at default precision,
and GPU autocast for a Linear layer). Parameters, the activations between matmuls, attention,
norms, softmax, the loss, gradients and the optimizer all stay float32: only the products are
rounded.

Written for XLA:CPU, where on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) a bf16
matmul runs at about twice the float32 rate, but only in its plain row-major form: a custom VJP
gives the backward pass two such matmuls (the incoming gradient rounded to bf16, as under
autocast), with the forward's operands saved already transposed. Left to JAX, the backward
matmuls take a transposed operand, which XLA:CPU upcasts to float32 and runs at half the float32
rate (micro-benchmarks in results/lm.md).
"""
import functools

import jax
import jax.numpy as jnp

MATMUL_DTYPES = ("float32", "bfloat16")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(x, w, dtype):
  """x [m, k] @ w [k, n] -> [m, n] float32, inputs rounded to `dtype`."""
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def transposed(x):
  """x [m, n] -> x.T [n, m], written out in memory. XLA folds a plain transpose into the matmul
  that consumes it; XLA:CPU then runs that matmul at about half speed (measured 85-95 vs 150-170
  GFLOP/s float32, JAX 0.10 and 0.12) and upcasts bf16 operands to float32. The rank-3 detour is
  not folded, so the matmul sees a row-major operand."""
  m, n = x.shape
  return x.reshape(m, n, 1).transpose(1, 0, 2).reshape(n, m)


def _matmul_2d_forward(x, w, dtype):
  x_low, w_low = x.astype(dtype), w.astype(dtype)
  # The backward's matmuls want x and w transposed: saved that way, written out in memory.
  # Zero-size stand-ins carry the primal dtypes to the backward (residuals must be arrays).
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return (jnp.dot(x_low, w_low, preferred_element_type=jnp.float32),
          (transposed(x_low), transposed(w_low), dtypes))


def _matmul_2d_backward(dtype, residuals, g):
  x_low_t, w_low_t, (x_dtype, w_dtype) = residuals
  g_low = g.astype(dtype)
  dx = jnp.dot(g_low, w_low_t, preferred_element_type=jnp.float32)
  dw = jnp.dot(x_low_t, g_low, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_matmul_2d.defvjp(_matmul_2d_forward, _matmul_2d_backward)


def rounded_matmul(x, w, dtype):
  """x [..., k] @ w [k, n] with both rounded to `dtype`, accumulated in float32 -> [..., n]
  float32; the gradients (x's and w's dtypes) come from matmuls with `dtype` inputs too.
  Leading axes fold into one, so every product is a single 2-D matmul (XLA:CPU's fast path)."""
  y = _matmul_2d(x.reshape(-1, x.shape[-1]), w, jnp.dtype(dtype))
  return y.reshape(*x.shape[:-1], w.shape[-1])


@functools.cache  # one function per dtype: modules holding it compare equal across builds
def dot_general(matmul_dtype: str):
  """-> the `dot_general` argument of nnx.Linear for `matmul_dtype`: lax.dot_general for
  float32, else one computing `rounded_matmul` (it serves nnx.Linear's x[..., k] @ w[k, n])."""
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype={matmul_dtype!r}: must be one of "
                     f"{', '.join(map(repr, MATMUL_DTYPES))}")
  if matmul_dtype == "float32":
    return jax.lax.dot_general
  dtype = jnp.dtype(matmul_dtype)

  def rounded_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                          out_sharding=None):
    del precision, preferred_element_type  # always float32 accumulation
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or w.ndim != 2:
      raise ValueError(f"matmul_dtype={matmul_dtype!r} serves x[..., k] @ w[k, n] (nnx.Linear); "
                       f"got dimension numbers {dimension_numbers} for {x.shape} @ {w.shape}")
    y = rounded_matmul(x, w, dtype)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)

  return rounded_dot_general

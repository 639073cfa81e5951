"""Gated MLP: SwiGLU (Shazeer 2020), the feed-forward block of LLaMA, Mistral and Gemma."""
import jax
from flax import nnx

from llmx.nn.axes import EMBED, MLP, with_axes
from llmx.nn.dropout import Dropout
from llmx.nn.precision import dot_general


class SwiGLU(nnx.Module):
  """x -> down(silu(gate(x)) * up(x)) over [tokens, d_model] activations.

  Gate and up projections are one [d_model, 2 * hidden] matmul (one large GEMM is faster than
  two on every backend); `hidden` is usually 8/3 * d_model so that the three matrices hold as
  many parameters as a 4x GELU MLP's two.
  """

  def __init__(self, d_model: int, hidden: int, *, use_bias: bool = False, dropout: float = 0.0,
               init_std: float = 0.02, out_init_std: float | None = None,
               matmul_dtype: str = "float32", rngs: nnx.Rngs):
    """matmul_dtype: "bfloat16" rounds each matmul's inputs to bf16 (llmx/nn/precision.py)."""
    self.hidden = hidden
    zeros = nnx.initializers.zeros_init()
    self.gate_up = nnx.Linear(d_model, 2 * hidden, use_bias=use_bias,
                              kernel_init=with_axes(nnx.initializers.normal(init_std), EMBED, MLP),
                              bias_init=with_axes(zeros, MLP),
                              dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, use_bias=use_bias,
                           kernel_init=with_axes(nnx.initializers.normal(out_init_std or init_std),
                                                 MLP, EMBED),
                           bias_init=with_axes(zeros, EMBED),
                           dot_general=dot_general(matmul_dtype), rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x, deterministic=None):
    h = self.gate_up(x)
    gate, up = h[..., :self.hidden], h[..., self.hidden:]
    return self.dropout(self.down(jax.nn.silu(gate) * up), deterministic=deterministic)

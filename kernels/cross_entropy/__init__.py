"""Linear cross-entropy: the loss of ``x @ weight`` against labels, without ``[N, V]`` logits.

``kernels.linear_cross_entropy(x, weight, labels, *, ignore_index=-100,
label_smoothing=0.0, z_loss=0.0, reduction="mean", implementation=None)``.

Implementations (one backend file each, registered in ``_IMPLEMENTATIONS``):

* ``"xla"``         -- ``reference.py``: logits matmul + logsumexp, XLA's autodiff.
  Fastest on CPU for small ``N * V``; materialises ``[N, V]`` float32 logits.
* ``"xla_chunked"`` -- ``xla_chunked.py``: ``lax.map``/``lax.scan`` over token and
  vocabulary chunks with an online log-sum-exp; its ``custom_vjp`` recomputes the
  logits per chunk in the backward.
* ``"triton"``      -- ``triton.py``: Pallas Triton forward and backward kernels.
* ``"mosaic_tpu"``  -- ``mosaic_tpu.py``: Pallas TPU (Mosaic) forward and backward kernels.
* ``"mosaic_gpu"``  -- ``mosaic_gpu.py``: Pallas Mosaic GPU (``plgpu``, Hopper) kernels, the
  matmuls as SMEM x SMEM wgmma; 16-bit ``x``/``weight``; JAX >= 0.11.

``implementation=None``: ``"mosaic_gpu"`` on GPUs with JAX >= 0.11 (``"triton"`` on older
JAX, or for arguments the Mosaic GPU kernels do not take, e.g. float32), ``"mosaic_tpu"``
on TPUs (the platform is ``kernels.platforms.current()``: see ``kernels.target_platform``);
elsewhere ``"xla"`` when
``N * V <= XLA_MAX_LOGITS`` (2**24 logits, 64 MiB in float32) and ``"xla_chunked"``
above it.
"""
from __future__ import annotations

import importlib
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from .. import platforms

# implementation name -> module holding ``per_token_loss(x, weight, labels, *, ...)``.
_IMPLEMENTATIONS = {
    "xla": ".reference",
    "xla_chunked": ".xla_chunked",
    "triton": ".triton",
    "mosaic_tpu": ".mosaic_tpu",
    "mosaic_gpu": ".mosaic_gpu",
}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)
REDUCTIONS = ("mean", "sum", "none")
XLA_MAX_LOGITS = 1 << 24


def default_implementation(n: int, v: int, backend: str | None = None) -> str:
  return platforms.pallas_default(backend) or ("xla" if n * v <= XLA_MAX_LOGITS else "xla_chunked")


def get_implementation(name: str):
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"linear_cross_entropy: unknown implementation={name!r}; choose from "
                     f"{', '.join(IMPLEMENTATIONS)} or None")
  return importlib.import_module(_IMPLEMENTATIONS[name], __name__).per_token_loss


def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def _static_float(name, value, lo, hi):
  if isinstance(value, jax.Array) or not isinstance(value, numbers.Real):
    raise TypeError(f"linear_cross_entropy: {name} must be a static Python number, "
                    f"got {type(value).__name__}")
  if not lo <= value <= hi:
    raise ValueError(f"linear_cross_entropy: {name}={value} must be in [{lo}, {hi}]")
  return float(value)


# The label of a position that has no loss (padding, an unselected MLM token), as in PyTorch.
IGNORE_INDEX = -100


def linear_cross_entropy(x, weight, labels, *, ignore_index=IGNORE_INDEX, label_smoothing=0.0,
                         z_loss=0.0, reduction="mean", implementation=None, interpret=False):
  """Cross-entropy of ``x @ weight`` against ``labels``, chunked and fused.

  Args:
    x: ``[N, D]`` floating-point activations.
    weight: ``[D, V]`` floating-point output projection (``x`` and ``weight`` are cast to
      their common dtype; matmuls accumulate in float32).
    labels: ``[N]`` integer class ids in ``[0, V)``, or ``ignore_index``.
    ignore_index: label value whose tokens contribute no loss and no gradient.
    label_smoothing: ``s`` in ``[0, 1]``: the target is ``(1 - s) * onehot + s / V``.
    z_loss: coefficient of the ``logsumexp(logits)**2`` penalty per token.
    reduction: ``"mean"`` (over non-ignored tokens; 0 if there are none), ``"sum"``, or
      ``"none"`` (``[N]`` losses, 0 at ignored tokens).
    implementation: ``None``, ``"xla"``, ``"xla_chunked"``, ``"triton"``, ``"mosaic_tpu"`` or
      ``"mosaic_gpu"``.
    interpret: run Pallas kernels in interpret mode (CPU testing).

  Returns:
    float32 scalar (``"mean"``, ``"sum"``) or ``[N]`` float32 array (``"none"``).
    Gradients flow to ``x`` and ``weight``. A label outside ``[0, V)`` that is not
    ``ignore_index`` raises ``ValueError`` when ``labels`` is concrete; under ``jit``
    (where values are unknown at trace time) that token's loss is NaN instead.
  """
  x, weight, labels = jnp.asarray(x), jnp.asarray(weight), jnp.asarray(labels)
  if x.ndim != 2:
    raise ValueError(f"linear_cross_entropy: x must be 2-D [N, D], got shape {x.shape}")
  if weight.ndim != 2:
    raise ValueError(f"linear_cross_entropy: weight must be 2-D [D, V], got shape "
                     f"{weight.shape}")
  if labels.ndim != 1:
    raise ValueError(f"linear_cross_entropy: labels must be 1-D [N], got shape {labels.shape}")
  n, d = x.shape
  if weight.shape[0] != d:
    raise ValueError(f"linear_cross_entropy: x.shape[1]={d} does not match "
                     f"weight.shape[0]={weight.shape[0]} (x is [N, D], weight is [D, V])")
  if labels.shape[0] != n:
    raise ValueError(f"linear_cross_entropy: labels.shape[0]={labels.shape[0]} does not match "
                     f"x.shape[0]={n}")
  for name, a in (("x", x), ("weight", weight)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"linear_cross_entropy: {name} must be floating-point, got dtype {a.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"linear_cross_entropy: labels must be integers, got dtype {labels.dtype}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"linear_cross_entropy: reduction={reduction!r} must be one of "
                     f"{', '.join(REDUCTIONS)}")
  if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
    raise TypeError(f"linear_cross_entropy: ignore_index must be a Python int, got "
                    f"{ignore_index!r}")
  label_smoothing = _static_float("label_smoothing", label_smoothing, 0.0, 1.0)
  z_loss = _static_float("z_loss", z_loss, 0.0, float("inf"))
  v = weight.shape[1]
  if v == 0:
    raise ValueError("linear_cross_entropy: weight has no columns (V = 0)")
  if _is_concrete(labels):
    lab = np.asarray(labels)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= v))
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"linear_cross_entropy: labels out of range [0, {v}): labels[{i}]="
                       f"{int(lab[i])} (and {int(bad.sum()) - 1} more); use "
                       f"ignore_index={ignore_index} to skip tokens")
  name = default_implementation(n, v) if implementation is None else implementation
  dtype = jnp.result_type(x.dtype, weight.dtype)
  name = platforms.gpu_fallback(
      name, implementation is not None,
      lambda: importlib.import_module(".mosaic_gpu", __name__).unsupported(n, d, v, dtype))
  fn = get_implementation(name)
  x, weight = x.astype(dtype), weight.astype(dtype)
  valid = labels != ignore_index
  if n == 0:
    loss = jnp.zeros((0,), jnp.float32)
  else:
    loss = fn(x, weight, labels, ignore_index=int(ignore_index), label_smoothing=label_smoothing,
              z_loss=z_loss, interpret=interpret)
  out_of_range = valid & ((labels < 0) | (labels >= v))
  loss = jnp.where(out_of_range, jnp.nan, loss)
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


__all__ = ["linear_cross_entropy", "IGNORE_INDEX", "IMPLEMENTATIONS", "REDUCTIONS", "default_implementation",
           "XLA_MAX_LOGITS"]

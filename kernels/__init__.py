"""Fused kernels for llmx, written in JAX Pallas.

Each op is one public function with an ``implementation=`` switch and a plain-XLA
reference beside it, forward and backward. This package imports jax only.
"""
from .attention import dot_product_attention

__all__ = ["dot_product_attention"]
from .softmax import softmax
from .norms import layer_norm, rms_norm
from .cross_entropy import linear_cross_entropy

__all__ += ["softmax", "layer_norm", "rms_norm", "linear_cross_entropy"]
from .platforms import target_platform

__all__ += ["target_platform"]

"""llmx: a JAX research framework for language models, on top of the fused kernels in `kernels/`."""
__version__ = "0.1.0"

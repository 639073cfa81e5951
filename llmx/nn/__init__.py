"""Layers built on the kernels: attention, MLP, norms. Each takes plain arguments, never a config."""

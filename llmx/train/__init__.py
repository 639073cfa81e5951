"""Training: optimizer, jit step, loop, checkpoints, metrics, meshes. Knows no model family."""

"""AdamW with warm-up + cosine decay, decoupled weight decay on matrices only, global-norm clipping."""
import jax
import optax


def warmup_cosine(peak: float, *, warmup_steps: int, decay_steps: int, end: float):
  """nanoGPT's schedule: step i < warmup uses peak * (i + 1) / (warmup + 1), so the first update is
  not wasted at lr 0; then cosine from `peak` to `end` at `decay_steps`, flat after."""
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / (warmup_steps + 1), peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(decay_steps, warmup_steps + 1), end_value=end)


def adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
          grad_clip: float | None = 1.0) -> optax.GradientTransformation:
  # Biases, norm scales and other vectors are not decayed, as in GPT-2 and nanoGPT.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx

"""Plain-jnp linear cross-entropy: the "xla" implementation and the shared loss algebra.

Per token, with logits ``z = x @ weight`` (float32 accumulation), ``lse = logsumexp(z)``,
label smoothing ``s`` and z-loss coefficient ``c``::

    loss = lse - (1 - s) * z[label] - (s / V) * sum(z) + c * lse**2
    dloss/dz = (1 + 2 c lse) * softmax(z) - (1 - s) * onehot(label) - s / V

Ignored tokens (``label == ignore_index``) have loss 0 and no gradient. This module
materialises the ``[N, V]`` logits: XLA fuses it well for small ``N * V``;
``xla_chunked.py`` and ``triton.py`` never do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def loss_from_stats(lse, label_logit, sum_logits, valid, *, vocab, label_smoothing, z_loss):
  """Per-token loss from the per-token statistics (all float32, shape [N])."""
  loss = lse - (1.0 - label_smoothing) * label_logit
  if label_smoothing:
    loss = loss - (label_smoothing / vocab) * sum_logits
  if z_loss:
    loss = loss + z_loss * lse * lse
  return jnp.where(valid, loss, 0.0)


def per_token_loss(x, weight, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   interpret=False, config=None):
  """``[N]`` float32 losses (0 for ignored tokens); XLA's autodiff gives the gradients."""
  del interpret, config
  vocab = weight.shape[1]
  logits = jnp.dot(x, weight, preferred_element_type=_F32)
  valid = labels != ignore_index
  safe = jnp.where(valid & (labels >= 0) & (labels < vocab), labels, 0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, safe[:, None].astype(jnp.int32), axis=-1)[:, 0]
  sum_logits = jnp.sum(logits, axis=-1) if label_smoothing else None
  return loss_from_stats(lse, label_logit, sum_logits, valid, vocab=vocab,
                         label_smoothing=label_smoothing, z_loss=z_loss)

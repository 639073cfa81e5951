"""Linear cross-entropy in plain XLA, chunked over tokens and vocabulary.

Forward: ``lax.map`` over token chunks of ``token_chunk`` rows; inside, ``lax.scan``
over vocabulary chunks of ``vocab_chunk`` columns computes a ``[token_chunk,
vocab_chunk]`` logits block, folds it into an online log-sum-exp, the label logit and
(for label smoothing) the logit sum, and drops it. Only ``lse`` per token is saved.

Backward (``jax.custom_vjp``): ``lax.scan`` over the same token chunks, and inside over
vocabulary chunks, recomputes each logits block, turns it into ``dloss/dlogits`` and
accumulates ``dx`` for the chunk and ``dweight`` (float32, carried through the scans).
Peak temporary memory is a few ``[token_chunk, vocab_chunk]`` blocks plus the float32
``dweight``, instead of several ``[N, V]`` arrays.

The token axis is padded to a multiple of ``token_chunk`` (padded tokens are ignored);
the last vocabulary chunk starts at ``V - vocab_chunk`` and masks the columns an earlier
chunk already counted, so ``weight`` is never copied or padded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .reference import loss_from_stats

_F32 = jnp.float32
DEFAULT_CONFIG = {"token_chunk": 1024, "vocab_chunk": 4096}


def _chunking(n, v, cfg):
  tn = max(1, min(int(cfg["token_chunk"]), n))
  tv = max(1, min(int(cfg["vocab_chunk"]), v))
  return tn, tv, -(-n // tn), -(-v // tv)


def _vocab_block(weight, j, tv):
  """Columns of vocabulary chunk j: (weight block, column ids, fresh-column mask)."""
  v = weight.shape[1]
  begin = j * tv
  start = jnp.minimum(begin, v - tv)
  w_blk = lax.dynamic_slice_in_dim(weight, start, tv, axis=1)
  cols = start + jnp.arange(tv)
  return w_blk, start, cols, cols >= begin


def _pad_tokens(n_chunks, tn, *arrays_and_fill):
  out = []
  for a, fill in arrays_and_fill:
    pad = n_chunks * tn - a.shape[0]
    if pad:
      a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)])
    out.append(a.reshape((n_chunks, tn) + a.shape[1:]))
  return out


def _stats(x, weight, labels, ignore_index, smoothing, tn, tv, nt, nv):
  """Per-token (lse, label logit, logit sum) without materialising the logits."""
  n = x.shape[0]
  xs, ls = _pad_tokens(nt, tn, (x, 0), (labels, ignore_index))

  def token_chunk(args):
    xc, lc = args

    def vocab_step(carry, j):
      m, s, ll, sl = carry
      w_blk, _, cols, fresh = _vocab_block(weight, j, tv)
      z = jnp.dot(xc, w_blk, preferred_element_type=_F32)
      zm = jnp.where(fresh[None, :], z, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(zm, axis=1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zm - m_new[:, None]), axis=1)
      hit = (cols[None, :] == lc[:, None]) & fresh[None, :]
      ll = ll + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
      if smoothing:
        sl = sl + jnp.sum(jnp.where(fresh[None, :], z, 0.0), axis=1)
      return (m_new, s, ll, sl), None

    init = (jnp.full((tn,), -jnp.inf, _F32),) + (jnp.zeros((tn,), _F32),) * 3
    (m, s, ll, sl), _ = lax.scan(vocab_step, init, jnp.arange(nv))
    return m + jnp.log(s), ll, sl

  lse, ll, sl = lax.map(token_chunk, (xs, ls))
  return lse.reshape(-1)[:n], ll.reshape(-1)[:n], sl.reshape(-1)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _lce(x, weight, labels, ignore_index, smoothing, z_loss, tn, tv):
  return _lce_fwd(x, weight, labels, ignore_index, smoothing, z_loss, tn, tv)[0]


def _lce_fwd(x, weight, labels, ignore_index, smoothing, z_loss, tn, tv):
  n, v = x.shape[0], weight.shape[1]
  nt, nv = -(-n // tn), -(-v // tv)
  lse, ll, sl = _stats(x, weight, labels, ignore_index, smoothing, tn, tv, nt, nv)
  loss = loss_from_stats(lse, ll, sl, labels != ignore_index, vocab=v,
                         label_smoothing=smoothing, z_loss=z_loss)
  return loss, (x, weight, labels, lse)


def _lce_bwd(ignore_index, smoothing, z_loss, tn, tv, res, g):
  x, weight, labels, lse = res
  n, d = x.shape
  v = weight.shape[1]
  nt, nv = -(-n // tn), -(-v // tv)
  gs = jnp.where(labels != ignore_index, g.astype(_F32), 0.0)
  xs, ls, lses, gss = _pad_tokens(nt, tn, (x, 0), (labels, ignore_index), (lse, 0), (gs, 0))
  mm_dtype = x.dtype

  def token_step(dw, args):
    xc, lc, lsec, gsc = args
    p_coef = (1.0 + 2.0 * z_loss * lsec) * gsc  # [tn]

    def vocab_step(carry, j):
      dxc, dw = carry
      w_blk, start, cols, fresh = _vocab_block(weight, j, tv)
      z = jnp.dot(xc, w_blk, preferred_element_type=_F32)
      dz = jnp.exp(z - lsec[:, None]) * p_coef[:, None]
      dz = dz - jnp.where(cols[None, :] == lc[:, None], (1.0 - smoothing) * gsc[:, None], 0.0)
      if smoothing:
        dz = dz - (smoothing / v) * gsc[:, None]
      dz = jnp.where(fresh[None, :], dz, 0.0).astype(mm_dtype)
      dxc = dxc + jnp.dot(dz, w_blk.T, preferred_element_type=_F32)
      dw_blk = lax.dynamic_slice_in_dim(dw, start, tv, axis=1)
      dw_blk = dw_blk + jnp.dot(xc.T, dz, preferred_element_type=_F32)
      dw = lax.dynamic_update_slice_in_dim(dw, dw_blk, start, axis=1)
      return (dxc, dw), None

    (dxc, dw), _ = lax.scan(vocab_step, (jnp.zeros((tn, d), _F32), dw), jnp.arange(nv))
    return dw, dxc

  dw, dxs = lax.scan(token_step, jnp.zeros((d, v), _F32), (xs, ls, lses, gss))
  dx = dxs.reshape(-1, d)[:n].astype(x.dtype)
  return dx, dw.astype(weight.dtype), None


_lce.defvjp(_lce_fwd, _lce_bwd)


def per_token_loss(x, weight, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   interpret=False, config=None):
  """``[N]`` float32 losses (0 for ignored tokens), chunked; see the module docstring.

  ``config``: ``{"token_chunk": int, "vocab_chunk": int}`` (defaults 1024 and 4096).
  """
  del interpret
  cfg = {**DEFAULT_CONFIG, **(config or {})}
  n, v = x.shape[0], weight.shape[1]
  tn, tv, _, _ = _chunking(n, v, cfg)
  return _lce(x, weight, labels.astype(jnp.int32), int(ignore_index), float(label_smoothing),
              float(z_loss), tn, tv)

"""Float64 numpy reference for attention: forward and explicit backward formulas.

Independent of JAX's autodiff and of kernels/attention/common.py, so the implementations are
checked against the math, not against themselves.
"""
import numpy as np


def visible_mask(b, n, t, s, *, causal=False, window=None, mask=None, q_seg=None, kv_seg=None):
  """Boolean [b, n, t, s]: True where query i may attend key j."""
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  vis = np.ones((b, n, t, s), bool)
  if causal:
    vis &= j <= i
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    vis &= (j >= i - left) & (j <= i + right)
  if mask is not None:
    vis &= np.broadcast_to(np.asarray(mask), vis.shape)
  if q_seg is not None:
    vis &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
  return vis


def attention_and_grads(q, k, v, do, *, bias=None, mask=None, scale=None, causal=False,
                        window=None, q_seg=None, kv_seg=None, soft_cap=None):
  """q [B,T,N,D], k/v [B,S,K,D], do [B,T,N,D] (the output cotangent), all cast to float64.

  Returns (out, dq, dk, dv, dbias or None). Rows with no visible key: zero output, zero grads.
  """
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  b, t, n, d = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  kk = np.repeat(k, g, axis=2)  # head h uses kv head h // g
  vv = np.repeat(v, g, axis=2)
  raw = np.einsum("btnd,bsnd->bnts", q, kk) * scale
  if bias is not None:
    raw = raw + np.asarray(bias, np.float64)
  logits = soft_cap * np.tanh(raw / soft_cap) if soft_cap is not None else raw
  vis = visible_mask(b, n, t, s_len, causal=causal, window=window, mask=mask, q_seg=q_seg,
                     kv_seg=kv_seg)
  masked = np.where(vis, logits, -np.inf)
  m = masked.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(vis, np.exp(masked - m), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l == 0, 1.0, l)
  out = np.einsum("bnts,bsnd->btnd", p, vv)
  dvv = np.einsum("bnts,btnd->bsnd", p, do)
  dp = np.einsum("btnd,bsnd->bnts", do, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  if soft_cap is not None:
    ds = ds * (1.0 - np.tanh(raw / soft_cap) ** 2)
  dbias = None
  if bias is not None:
    shape = np.shape(bias)
    axes = tuple(a for a in range(4) if shape[a] == 1 and ds.shape[a] != 1)
    dbias = ds.sum(axis=axes, keepdims=True).reshape(shape)
  dq = np.einsum("bnts,bsnd->btnd", ds, kk) * scale
  dkk = np.einsum("bnts,btnd->bsnd", ds, q) * scale
  dk = dkk.reshape(b, s_len, kh, g, d).sum(3)
  dv = dvv.reshape(b, s_len, kh, g, d).sum(3)
  return out, dq, dk, dv, dbias

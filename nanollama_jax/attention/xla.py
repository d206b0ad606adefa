"""Attention in plain jax.numpy, which XLA compiles for any backend.

`xla_attention` is the training path: a flash-attention-style formulation in ordinary XLA ops.
- Short sequences (at most SAVE_PROBS_MAX_KEYS keys) keep each block's unnormalised
  probabilities and their row sums for the backward pass: the probabilities weigh no more than
  the layer's other saved activations there, and the backward skips a matmul and an exp.
- Longer ones keep only the log-sum-exp of each query's scores; a custom VJP recomputes the
  probabilities from it, so no T x S array outlives its layer's forward (and the backward needs
  no max or sum over the scores again).
- Causal self-attention is cut into blocks of queries; block i only meets the keys up to its
  own end, so the blocks above the diagonal (almost half the T x S work for many blocks) are
  never computed.
- Heads lead the time axes (BxKxGxTxE), so the einsums' batch dimensions come first and XLA
  makes no transposed copies of the scores; the mask enters as an additive bias.

`masked_attention` is the plain softmax(q k^T) v with an explicit mask: the reference the tests
hold `xla_attention` to. `cached_attention` is the KV-cache decoding path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = jnp.finfo(jnp.float32).min  # added to the scores of keys a query may not see
# Query blocks of causal attention: at least this long, and at most this many per sequence.
# T 256 runs as 4 blocks of 64 (62.5% of the T x S work); T 2048 as 8 blocks of 256 (56%).
MIN_BLOCK, MAX_BLOCKS = 64, 8
# Up to this many keys the forward's probabilities are kept for the backward pass. At 256 keys
# (the CPU benchmark: 6 heads, dim 288) they are 8 MB a layer for 8 sequences, about a quarter of
# the layer's other activations; at 512 keys about half.
SAVE_PROBS_MAX_KEYS = 512


def _blocks(T: int, S: int, causal: bool) -> list[tuple[int, int, int]]:
  """(query start, query end, keys seen) per block of queries."""
  block = max(MIN_BLOCK, -(-T // MAX_BLOCKS))
  if not causal or T != S or T <= block:
    return [(0, T, S)]
  return [(start, min(start + block, T), min(start + block, T)) for start in range(0, T, block)]


def _bias(segment_ids_BxT: jax.Array | None, q0: int, q1: int, keys: int, causal: bool,
          offset: int) -> jax.Array | None:
  """The additive mask of queries [q0, q1) over keys [0, keys), as Bx1x1xTqxS (or None)."""
  mask = None
  if causal:
    # Queries are the last T of the S key positions (offset S - T; 0 in training).
    mask = (jnp.arange(q0, q1)[:, None] + offset >= jnp.arange(keys)[None, :])[None]
  if segment_ids_BxT is not None:
    same = segment_ids_BxT[:, q0:q1, None] == segment_ids_BxT[:, None, :keys]
    mask = same if mask is None else mask & same
  if mask is None:
    return None
  return jnp.where(mask, 0.0, _MASKED)[:, None, None]


def _scores(q_BxKxGxTxE, k_BxKxSxE, bias):
  s = jnp.einsum("bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE, preferred_element_type=jnp.float32)
  return s if bias is None else s + bias


def _forward(q, k, v, segment_ids, causal):
  """Attention of pre-scaled q (BxKxGxTxE) over k, v (BxKxSxE).

  Returns (out, per-block unnormalised probabilities, per-block row sums, log-sum-exp)."""
  T, S = q.shape[3], k.shape[2]
  outs, probs, totals, lses = [], [], [], []
  for q0, q1, keys in _blocks(T, S, causal):
    s = _scores(q[:, :, :, q0:q1], k[:, :, :keys], _bias(segment_ids, q0, q1, keys, causal, S - T))
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    # Normalise after the second matmul: T x E divisions instead of T x S.
    o = jnp.einsum("bkgts,bkse->bkgte", p.astype(v.dtype), v[:, :, :keys],
                   preferred_element_type=jnp.float32) / total
    outs.append(o.astype(q.dtype))
    probs.append(p)
    totals.append(total)
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=3), probs, totals, jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, causal, save_probs):
  return _forward(q, k, v, segment_ids, causal)[0]


def _attention_fwd(q, k, v, segment_ids, causal, save_probs):
  out, probs, totals, lse = _forward(q, k, v, segment_ids, causal)
  saved = (probs, totals) if save_probs else lse
  return out, (q, k, v, segment_ids, out, saved)


def _attention_bwd(causal, save_probs, residuals, dout):
  q, k, v, segment_ids, out, saved = residuals
  T, S = q.shape[3], k.shape[2]
  f32 = jnp.float32
  # d softmax: p * (dp - rowsum(p * dp)), and rowsum(p * dp) = rowsum(dout * out) per query.
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  dqs = []
  B, K, S_, E = k.shape
  dk_t, dv_t = jnp.zeros((B, K, E, S_), f32), jnp.zeros((B, K, E, S_), f32)
  for i, (q0, q1, keys) in enumerate(_blocks(T, S, causal)):
    qi, di = q[:, :, :, q0:q1], dout[:, :, :, q0:q1]
    ki, vi = k[:, :, :keys], v[:, :, :keys]
    if save_probs:
      # Saved p is unnormalised: the division by its row sum goes on the T x E operand of dv
      # and on dp - delta, not on the T x S block.
      p, inv_total = saved[0][i], 1.0 / saved[1][i]
    else:  # p recomputed from the log-sum-exp is normalised (XLA drops the * 1.0)
      p, inv_total = jnp.exp(_scores(qi, ki, _bias(segment_ids, q0, q1, keys, causal, S - T))
                             - saved[:, :, :, q0:q1]), 1.0
    dv_i = jnp.einsum("bkgte,bkgts->bkes", (di * inv_total).astype(dout.dtype),
                      p.astype(dout.dtype), preferred_element_type=f32)
    dp = jnp.einsum("bkgte,bkse->bkgts", di, vi, preferred_element_type=f32)
    ds = (p * ((dp - delta[:, :, :, q0:q1]) * inv_total)).astype(q.dtype)
    dqs.append(jnp.einsum("bkgts,bkse->bkgte", ds, ki, preferred_element_type=f32))
    dk_i = jnp.einsum("bkgte,bkgts->bkes", qi, ds, preferred_element_type=f32)
    dk_t, dv_t = dk_t.at[..., :keys].add(dk_i), dv_t.at[..., :keys].add(dv_i)
  dq = jnp.concatenate(dqs, axis=3)
  dk, dv = dk_t.transpose(0, 1, 3, 2), dv_t.transpose(0, 1, 3, 2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def xla_attention(
  q_BxTxHxE: jax.Array,
  k_BxSxKxE: jax.Array,
  v_BxSxKxE: jax.Array,
  segment_ids_BxT: jax.Array | None,
  causal: bool,
  save_probs: bool | None = None,
) -> jax.Array:
  """Softmax(q k^T / sqrt(E)) v with float32 scores; K/V heads are shared, never repeated.

  `save_probs` keeps the probabilities for the backward pass instead of recomputing them;
  None decides by the number of keys (at most SAVE_PROBS_MAX_KEYS).
  """
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if segment_ids_BxT is not None and S != T:
    raise ValueError(f"segment ids need self-attention (T == S), got T={T}, S={S}")
  # The 1/sqrt(E) scale goes on q (T x E values), not on the T x S scores.
  q_BxTxHxE = q_BxTxHxE * jnp.asarray(E**-0.5, q_BxTxHxE.dtype)
  q_BxKxGxTxE = q_BxTxHxE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
  out_BxKxGxTxE = _attention(q_BxKxGxTxE, k_BxSxKxE.transpose(0, 2, 1, 3),
                             v_BxSxKxE.transpose(0, 2, 1, 3), segment_ids_BxT, causal,
                             S <= SAVE_PROBS_MAX_KEYS if save_probs is None else save_probs)
  return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def masked_attention(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array,
                     mask_BxTxS: jax.Array) -> jax.Array:
  """Attention of T queries over S keys with an explicit boolean mask."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxSxKxE.shape[2]
  q_BxKxGxTxE = q_BxTxHxE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
  k_BxKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3)
  v_BxKxSxE = v_BxSxKxE.transpose(0, 2, 1, 3)
  scores_BxKxGxTxS = jnp.einsum(
    "bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE, preferred_element_type=jnp.float32
  ) * (E**-0.5)
  bias_BxTxS = jnp.where(mask_BxTxS, 0.0, _MASKED)
  scores_BxKxGxTxS = scores_BxKxGxTxS + bias_BxTxS[:, None, None]
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxE.dtype)
  out_BxKxGxTxE = jnp.einsum("bkgts,bkse->bkgte", probs_BxKxGxTxS, v_BxKxSxE)
  return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def cached_attention(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                     mask_BxTxS: jax.Array) -> jax.Array:
  """masked_attention over keys and values laid out as the KV cache keeps them, heads before
  slots: the decoding path, one query (or a few) per row against the whole cache, with no
  transposed copy of it."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxKxSxE.shape[1]
  q_BxKxGxTxE = q_BxTxHxE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4) * (E**-0.5)
  scores_BxKxGxTxS = jnp.einsum("bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE,
                                preferred_element_type=jnp.float32)
  scores_BxKxGxTxS = scores_BxKxGxTxS + jnp.where(mask_BxTxS, 0.0, _MASKED)[:, None, None]
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxKxSxE.dtype)
  out_BxKxGxTxE = jnp.einsum("bkgts,bkse->bkgte", probs_BxKxGxTxS, v_BxKxSxE)
  return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)

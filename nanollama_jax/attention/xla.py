"""The reference attention in plain jax.numpy, which XLA compiles for any backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(
  q_BxTxHxE: jax.Array,
  k_BxSxKxE: jax.Array,
  v_BxSxKxE: jax.Array,
  segment_ids_BxT: jax.Array | None,
  causal: bool,
) -> jax.Array:
  """Softmax(q k^T / sqrt(E)) v with float32 scores; K/V heads are shared, never repeated.

  The backward pass recomputes the scores from q, k and v instead of keeping the T x S
  probabilities of every layer, as flash attention does: less memory on every backend, and on
  a CPU, where moving those arrays costs more than the two recomputed einsums, a faster step.
  """
  T, S = q_BxTxHxE.shape[1], k_BxSxKxE.shape[1]
  mask_BxTxS = jnp.ones((1, T, S), dtype=bool)
  if causal:
    # Queries are the last T of the S key positions (S == T in training).
    mask_BxTxS = mask_BxTxS & (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])
  if segment_ids_BxT is not None:
    if S != T:
      raise ValueError(f"segment ids need self-attention (T == S), got T={T}, S={S}")
    mask_BxTxS = mask_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  return jax.checkpoint(masked_attention)(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS)


def masked_attention(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array,
                     mask_BxTxS: jax.Array) -> jax.Array:
  """Attention of T queries over S keys with an explicit boolean mask (decoding a KV cache).

  Heads lead the time axes in both einsums (BxKxGxTxE), so their batch dimensions come first
  and XLA needs no transposed copy of the T x S scores; the mask is added as a bias, so the
  backward pass has no select over the scores.
  """
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxSxKxE.shape[2]
  q_BxKxGxTxE = q_BxTxHxE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
  k_BxKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3)
  v_BxKxSxE = v_BxSxKxE.transpose(0, 2, 1, 3)
  scores_BxKxGxTxS = jnp.einsum(
    "bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE, preferred_element_type=jnp.float32
  ) * (E**-0.5)
  bias_BxTxS = jnp.where(mask_BxTxS, 0.0, jnp.finfo(jnp.float32).min)
  scores_BxKxGxTxS = scores_BxKxGxTxS + bias_BxTxS[:, None, None]
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxE.dtype)
  out_BxKxGxTxE = jnp.einsum("bkgts,bkse->bkgte", probs_BxKxGxTxS, v_BxKxSxE)
  return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)

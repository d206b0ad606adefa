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
  """Softmax(q k^T / sqrt(E)) v with float32 scores; K/V heads are shared, never repeated."""
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  scores_BxKxGxTxS = jnp.einsum(
    "btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32
  ) * (E**-0.5)

  mask_BxTxS = jnp.ones((1, T, S), dtype=bool)
  if causal:
    # Queries are the last T of the S key positions (S == T in training).
    mask_BxTxS = mask_BxTxS & (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])
  if segment_ids_BxT is not None:
    if S != T:
      raise ValueError(f"segment ids need self-attention (T == S), got T={T}, S={S}")
    mask_BxTxS = mask_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  return _masked_softmax_values(scores_BxKxGxTxS, mask_BxTxS, v_BxSxKxE).reshape(B, T, H, E)


def _masked_softmax_values(scores_BxKxGxTxS, mask_BxTxS, v_BxSxKxE):
  scores_BxKxGxTxS = jnp.where(
    mask_BxTxS[:, None, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min
  )
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxE.dtype)
  return jnp.einsum("bkgts,bske->btkge", probs_BxKxGxTxS, v_BxSxKxE)


def masked_attention(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array,
                     mask_BxTxS: jax.Array) -> jax.Array:
  """Attention of T queries over S keys with an explicit boolean mask (decoding a KV cache)."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxSxKxE.shape[2]
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  scores_BxKxGxTxS = jnp.einsum(
    "btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32
  ) * (E**-0.5)
  return _masked_softmax_values(scores_BxKxGxTxS, mask_BxTxS, v_BxSxKxE).reshape(B, T, H, E)

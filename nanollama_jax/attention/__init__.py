"""Attention behind one function; `impl` picks the implementation (model.attention).

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (K divides H,
G = H // K query heads share one K/V head), E head dim.
"""

from __future__ import annotations

import jax

from nanollama_jax.attention.xla import xla_attention

IMPLS = {"xla": xla_attention}


def attention(
  q_BxTxHxE: jax.Array,
  k_BxSxKxE: jax.Array,
  v_BxSxKxE: jax.Array,
  segment_ids_BxT: jax.Array | None = None,
  causal: bool = True,
  impl: str = "xla",
) -> jax.Array:
  """Scaled dot-product attention with GQA, causal masking and packed-document isolation."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; allowed: {', '.join(IMPLS)}")
  return IMPLS[impl](q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal)

"""Attention behind one function; `impl` picks the implementation (model.attention).

  xla     plain jax.numpy (attention/xla.py): any backend, the reference
  pallas  our flash-attention kernel for CUDA GPUs (attention/pallas.py); interpret mode on
          CPUs for tests only
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs
  auto    pallas on a GPU, xla elsewhere

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (K divides H,
G = H // K query heads share one K/V head), E head dim.
"""

from __future__ import annotations

import jax

from nanollama_jax.attention.xla import xla_attention

IMPLS = ("xla", "pallas", "cudnn", "auto")


def _cudnn_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal):
  if jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; this run is on "
                     f"{jax.default_backend()}: use 'xla' or 'auto'")
  mask = None
  if segment_ids_BxT is not None:
    mask = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
  out = jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask=mask,
                                     is_causal=causal, implementation="cudnn")
  return out.astype(q_BxTxHxE.dtype)


def resolve(impl: str) -> str:
  """The implementation `impl` stands for on this backend ('auto' resolved)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; allowed: {', '.join(IMPLS)}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def attention(
  q_BxTxHxE: jax.Array,
  k_BxSxKxE: jax.Array,
  v_BxSxKxE: jax.Array,
  segment_ids_BxT: jax.Array | None = None,
  causal: bool = True,
  impl: str = "xla",
) -> jax.Array:
  """Scaled dot-product attention with GQA, causal masking and packed-document isolation."""
  impl = resolve(impl)
  if impl == "pallas":
    from nanollama_jax.attention.pallas import pallas_attention  # pylint: disable=import-outside-toplevel
    return pallas_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal)
  if impl == "cudnn":
    return _cudnn_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal)
  return xla_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal)

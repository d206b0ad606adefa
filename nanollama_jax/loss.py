"""The token-weighted next-token cross-entropy of a packed batch, plain or in chunks.

Shape letters as in model.py: B batch, T sequence length, D model dim, V vocabulary, C positions
per chunk, N chunks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nanollama_jax import model

# model.chunked_loss="auto" computes the loss in chunks from this vocabulary size on, where the
# float32 logits (B x T x V x 4 bytes, and as much again for their gradient) dominate memory.
CHUNKED_LOSS_MIN_VOCAB = 16384


def chunked_loss(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the loss of `model_cfg` (the model group) runs in chunks (model.chunked_loss)."""
  if model_cfg.chunked_loss == "auto":
    return model_cfg.vocab_size >= CHUNKED_LOSS_MIN_VOCAB
  return model_cfg.chunked_loss == "on"


def loss_sums(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """A packed batch's summed next-token loss over its unmasked targets, and their number."""
  llama = nnx.merge(graphdef, params)
  x_BxTxD = llama.features(batch["inputs"], batch["segment_ids"], batch["positions"])
  model_cfg = llama.model_cfg
  if chunked_loss(model_cfg):
    return chunked_cross_entropy(x_BxTxD, llama.head(), batch["targets"], batch["loss_mask"],
                                 model_cfg.loss_chunk_len, jnp.dtype(model_cfg.dtype))
  logits_BxTxV = model.output_logits(x_BxTxD, llama.head(), jnp.dtype(model_cfg.dtype))
  return cross_entropy(logits_BxTxV, batch["targets"], batch["loss_mask"])


def _chunks(x_BxT: jax.Array, n: int, size: int) -> jax.Array:
  """[B, T, ...] as [n, B, size, ...]: T padded with zeros to n * size, then cut."""
  pad = n * size - x_BxT.shape[1]
  x_BxT = jnp.pad(x_BxT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT.ndim - 2))
  return jnp.moveaxis(x_BxT.reshape(x_BxT.shape[0], n, size, *x_BxT.shape[2:]), 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(x_BxTxD, head_DxV, targets_BxT, mask_BxT, size, dtype):
  return _chunked_ce_fwd(x_BxTxD, head_DxV, targets_BxT, mask_BxT, size, dtype)[0]


def _chunked_ce_fwd(x_BxTxD, head_DxV, targets_BxT, mask_BxT, size, dtype):
  n = -(-x_BxTxD.shape[1] // size)
  xs = (_chunks(x_BxTxD, n, size), _chunks(targets_BxT, n, size), _chunks(mask_BxT, n, size))

  def chunk(total, c):
    x_BxCxD, targets_BxC, mask_BxC = c
    logits_BxCxV = model.output_logits(x_BxCxD, head_DxV, dtype)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return total + jnp.sum((lse_BxC - target_BxC) * mask_BxC), lse_BxC

  loss, lse_NxBxC = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), xs)
  return loss, (x_BxTxD, head_DxV, targets_BxT, mask_BxT, lse_NxBxC)


def _chunked_ce_bwd(size, dtype, residuals, g):
  x_BxTxD, head_DxV, targets_BxT, mask_BxT, lse_NxBxC = residuals
  B, T, D = x_BxTxD.shape
  n = lse_NxBxC.shape[0]
  xs = (_chunks(x_BxTxD, n, size), _chunks(targets_BxT, n, size), _chunks(mask_BxT, n, size),
        lse_NxBxC)
  head = head_DxV.astype(dtype)

  def chunk(dhead_DxV, c):
    x_BxCxD, targets_BxC, mask_BxC, lse_BxC = c
    logits_BxCxV = model.output_logits(x_BxCxD, head_DxV, dtype)
    # d loss / d logits = (softmax - one-hot) per unmasked target, times the incoming g.
    probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    onehot_BxCxV = jax.nn.one_hot(targets_BxC, probs_BxCxV.shape[-1], dtype=jnp.float32)
    dlogits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * (mask_BxC * g)[..., None]).astype(dtype)
    dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, head,
                          preferred_element_type=jnp.float32)
    dhead_DxV = dhead_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD.astype(dtype), dlogits_BxCxV,
                                       preferred_element_type=jnp.float32)
    return dhead_DxV, dx_BxCxD

  dhead_DxV, dx_NxBxCxD = jax.lax.scan(chunk, jnp.zeros(head_DxV.shape, jnp.float32), xs)
  dx_BxTxD = jnp.moveaxis(dx_NxBxCxD, 0, 1).reshape(B, n * size, D)[:, :T]
  return (dx_BxTxD.astype(x_BxTxD.dtype), dhead_DxV.astype(head_DxV.dtype), None, None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array,
                          mask_BxT: jax.Array, chunk_len: int,
                          dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` of the output layer's logits, `chunk_len` positions at a time.

  A custom VJP recomputes each chunk's logits in the backward pass from the saved log-sum-exp,
  so the float32 [B, T, V] logits and their gradient never exist whole: the peak is one chunk's
  [B, chunk_len, V]. Same numbers as the plain path (the same matmuls, per chunk).
  """
  mask_BxT = mask_BxT.astype(jnp.float32)
  size = min(chunk_len, x_BxTxD.shape[1])
  loss = _chunked_ce(x_BxTxD, head_DxV, targets_BxT.astype(jnp.int32), mask_BxT, size,
                     jnp.dtype(dtype))
  return loss, jnp.sum(mask_BxT)


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                  mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns the masked sum of next-token losses and the number of tokens it covers."""
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT)
  mask_BxT = mask_BxT.astype(jnp.float32)
  return jnp.sum(losses_BxT * mask_BxT), jnp.sum(mask_BxT)

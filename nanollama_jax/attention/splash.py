"""Attention on TPUs: JAX's splash-attention kernels (Pallas, Mosaic TPU) under our contract.

- GQA without copies: splash's multi-head kernel takes K and V with fewer heads than q and reads
  K/V head h // G for query head h; its dk/dv kernel accumulates over the G query heads of each
  K/V head. K and V are never repeated in memory.
- Causal attention is a static mask: the kernel skips the blocks above the diagonal. Documents
  are segment ids (splash's SegmentIds), compared inside the blocks it does compute.
- Splash does not scale the scores: q is multiplied by 1/sqrt(E) in its own dtype first, the
  same rounding as the xla path.
- Sequences are padded to a multiple of 128 (blocks are chosen to divide the padded length);
  padded queries and keys get segment ids that match nothing (-2 and -1; real ids are >= 0)
  and the outputs are cut back. Padded queries get zero gradients, so they add nothing to dk
  and dv.
- The kernels take one sequence ([H, T, E], K/V [K, T, E]): a vmap runs them over the batch.
- Forward and backward are three kernels: the forward saves the log-sum-exp per query; one
  kernel computes dq, another dk and dv (splash's separate, not fused, backward).

Block sizes. A kernel stays compute-bound while its FLOPs per byte of HBM traffic exceed the
chip's peak FLOPs per byte of bandwidth: about 224 on v4 (275 TFLOP/s, 1.23 TB/s), 240 on v5e
(197, 0.82), 187 on v5p (459, 2.46) and 561 on v6e (918, 1.64), by the per-chip numbers JAX
lists in pallas/mosaic/tpu_info.py. In bfloat16, per block of bq queries and bkv keys:
  forward  reads K and V (4 x bkv x E bytes), does 4 x bq x bkv x E FLOPs: bq per byte
  dq       reads K and V, does 6 x bq x bkv x E FLOPs (scores, dp, dq): 1.5 x bq per byte
  dk/dv    reads q and dout (4 x bq x E bytes), does 8 x bq x bkv x E FLOPs: 2 x bkv per byte
We ask each for at least 1.8 times the chip's ratio, with blocks that are multiples of the MXU's
width (128; 256 on v6e): 512 throughout on v4, v5e and v5p (512, 768 and 1024 FLOPs per byte);
on v6e the query blocks of the forward and dq grow to 1024 (1024 and 1536; dk/dv's 512 keys give
1024 already). The other dimension of each block is 512. Our count of the largest working set,
v6e's dq at E = 128 (double-buffered blocks, float32 accumulators, the 1024 x 512 float32 scores
and the arrays derived from them), is about 10 MiB, under the 16 MiB of VMEM per core of v4,
the smallest of the four (64 MiB on v5p, 128 MiB on v5e and v6e); no VMEM limit is raised, and
a compiler that refused a block would say so when the step is compiled. Other generations get
512 throughout, the default of MaxText's configs. Blocks never exceed the (padded) sequence; a
sequence of 2048 runs as 4 x 4 forward blocks (causal: 10 of the 16 computed) on v4 to v5p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # block sizes are multiples of the TPU's 128 lanes
_PAD_Q, _PAD_KV = -2, -1  # segment ids of padding: padded queries match no key, keys no query
BLOCK = 512  # every block dimension but the ones below; see the module docstring
_QUERY_BLOCKS = {"v6e": 1024}  # generation -> query blocks of the forward and dq kernels


def _fit(block: int, length: int) -> int:
  """The largest of block, block / 2, ..., 128 that divides `length` (a multiple of 128)."""
  while length % block:
    block //= 2
  return block


def choose_blocks(length: int, generation: str | None) -> splash.BlockSizes:
  """Splash block sizes for a sequence padded to `length` on TPU `generation` (None: 128
  throughout, for interpret mode)."""
  block = LANES if generation is None else BLOCK
  queries = LANES if generation is None else _QUERY_BLOCKS.get(generation, BLOCK)
  block, queries = _fit(min(block, length), length), _fit(min(queries, length), length)
  return splash.BlockSizes(
    block_q=queries, block_kv=block, block_kv_compute=block,
    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
    block_q_dq=queries, block_kv_dq=block)


@functools.lru_cache(maxsize=64)
def _make_kernel(heads: int, length: int, causal: bool, blocks: splash.BlockSizes,
                 interpret: bool) -> splash.splash_attention_kernel.SplashAttentionKernel:
  """The splash kernel for one sequence of `length` with `heads` query heads.

  Its block-sparsity tables are concrete arrays (made outside any trace, so that the cache can
  hand them to later traces); they enter the program as constants.
  """
  shape = (length, length)
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask((mask,) * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array,
                     segment_ids_BxT: jax.Array | None = None, causal: bool = True,
                     generation: str | None = None, interpret: bool = False) -> jax.Array:
  """Splash attention (forward and backward kernels); same contract as the xla reference.

  `generation` ('v5e') picks the block sizes; `interpret` runs the kernels in Pallas interpret
  mode on any backend (tests on a CPU), with 128 x 128 blocks.
  """
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if S != T:
    raise ValueError(f"the splash kernel here does self-attention (T == S), got T={T}, S={S}")
  if H % K:
    raise ValueError(f"{H} query heads cannot share {K} K/V heads")
  if generation is None and not interpret:
    raise ValueError("splash_attention needs a TPU generation (e.g. 'v5e') or interpret=True")
  padded = -(-T // LANES) * LANES
  pad = padded - T
  kernel = _make_kernel(H, padded, causal, choose_blocks(padded, generation), interpret)
  q_BxHxTxE = (q_BxTxHxE * jnp.asarray(E**-0.5, q_BxTxHxE.dtype)).transpose(0, 2, 1, 3)
  k_BxKxTxE, v_BxKxTxE = k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q_BxHxTxE, k_BxKxTxE, v_BxKxTxE = (jnp.pad(x, widths)
                                       for x in (q_BxHxTxE, k_BxKxTxE, v_BxKxTxE))
  segments = None
  # Causal attention keeps padded keys (positions >= T) from every real query on its own.
  if segment_ids_BxT is not None or (pad and not causal):
    seg_BxT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None
               else segment_ids_BxT.astype(jnp.int32))
    segments = splash.SegmentIds(
      q=jnp.pad(seg_BxT, ((0, 0), (0, pad)), constant_values=_PAD_Q),
      kv=jnp.pad(seg_BxT, ((0, 0), (0, pad)), constant_values=_PAD_KV))
  out_BxHxTxE = jax.vmap(kernel)(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segments)
  return out_BxHxTxE[:, :, :T].transpose(0, 2, 1, 3)

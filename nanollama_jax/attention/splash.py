"""Attention on TPUs: JAX's splash-attention kernels (Pallas, Mosaic TPU) under our contract.

- GQA without copies: splash's multi-head kernel takes K and V with fewer heads than q and reads
  K/V head h // G for query head h; its dk/dv kernel accumulates over the G query heads of each
  K/V head. K and V are never repeated in memory.
- Causal attention is a static mask: the kernel skips the blocks above the diagonal. Documents
  are segment ids (splash's SegmentIds), compared inside the blocks it does compute.
- Splash does not scale the scores: q is multiplied by 1/sqrt(E) in its own dtype first, the
  same rounding as the xla path.
- Sequences are padded to a multiple of the block size; padded queries and keys get segment
  ids that match nothing (-2 and -1; real ids are >= 0) and the outputs are cut back. Padded
  queries get zero gradients, so they add nothing to dk and dv.
- The kernels take one sequence ([H, T, E], K/V [K, T, E]): a vmap runs them over the batch.
- Forward and backward are three kernels: the forward saves the log-sum-exp per query; one
  kernel computes dq, another dk and dv (splash's separate, not fused, backward).

Block sizes. The forward of a block of bq queries reads every K/V block it meets from HBM
(2 x bkv x E values) and does 4 x bq x bkv x E FLOPs on it: bq FLOPs per byte of bfloat16 K/V
traffic (the dq kernel likewise; the dk/dv kernel reads q and dout for each block of bkv_dkv
keys: bkv_dkv FLOPs per byte). The kernel is compute-bound while that exceeds the chip's peak
FLOPs per byte of HBM bandwidth: about 224 on v4 (275 TFLOP/s, 1.23 TB/s), 240 on v5e (197,
0.82), 187 on v5p (459, 2.46) and 561 on v6e (918, 1.64), by the per-chip numbers JAX lists in
pallas/mosaic/tpu_info.py. Hence the reused dimension (bq, bq_dq, bkv_dkv) is 512 on v4, v5e
and v5p and 1024 on v6e; the streamed one (bkv, bq_dkv) is 512, a multiple of every MXU's width
(128; 256 on v6e). The largest working set, v6e's forward at E = 128 (double-buffered q, out,
K and V blocks, float32 accumulators, the 1024 x 512 float32 scores and their exponentials), is
about 8 MiB: within the 16 MiB of VMEM per core of v4, the smallest of the four (64 MiB on v5p,
128 MiB on v5e and v6e), so no VMEM limit is raised. Other generations get 512 throughout, the
default of MaxText's configs. Blocks never exceed the (padded) sequence; a sequence of 2048
then runs as 4 x 4 forward blocks (causal: 10 of the 16 computed) on v4-v5p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # block sizes are multiples of the TPU's 128 lanes
_PAD_Q, _PAD_KV = -2, -1  # segment ids of padding: padded queries match no key, keys no query
# Generation -> (reused block, streamed block); see the module docstring.
_BLOCKS = {"v4": (512, 512), "v5e": (512, 512), "v5p": (512, 512), "v6e": (1024, 512)}
_OTHER_BLOCKS = (512, 512)


def _fit(block: int, length: int) -> int:
  """The largest of block, block / 2, ..., 128 that divides `length` (a multiple of 128)."""
  while length % block:
    block //= 2
  return block


def choose_blocks(length: int, generation: str | None) -> splash.BlockSizes:
  """Splash block sizes for a sequence padded to `length` on TPU `generation` (None: the
  interpret mode's smallest blocks)."""
  reused, streamed = (LANES, LANES) if generation is None else _BLOCKS.get(generation,
                                                                           _OTHER_BLOCKS)
  reused, streamed = _fit(min(reused, length), length), _fit(min(streamed, length), length)
  return splash.BlockSizes(
    block_q=reused, block_kv=streamed, block_kv_compute=streamed,
    block_q_dkv=streamed, block_kv_dkv=reused, block_kv_dkv_compute=streamed,
    block_q_dq=reused, block_kv_dq=streamed)


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

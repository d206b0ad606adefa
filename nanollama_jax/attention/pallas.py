"""Flash attention for CUDA GPUs in Pallas (Triton backend): GQA, causal, packed documents.

Forward: one program per (batch, query head, block of queries) streams the K/V blocks of its
K/V head (query head h reads K/V head h // (H // K); K and V are never repeated in memory),
keeping an online softmax in float32. Causal attention stops at the diagonal block instead of
masking the blocks above it. Segment ids mask keys of other documents; sequences that are not a
multiple of the block size are padded with segment ids that match nothing, and cut back.

Backward (jax.custom_vjp): the forward saves the log-sum-exp per query; one kernel recomputes
the probabilities per block of queries to get dq, another per block of keys for dk and dv (per
query head, then summed over the heads that share a K/V head).

The kernels pass Triton compiler parameters (warps, pipeline stages) explicitly, which makes
Pallas lower through Triton on any CUDA GPU (sm_80 and up) rather than Mosaic GPU (Hopper only).
On a CPU they run only in interpret mode, which the tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Segment ids given to padding: padded queries match no key, padded keys no query.
_PAD_Q, _PAD_KV = -2, -1
INTERPRET_ENV = "NANOLLAMA_PALLAS_INTERPRET"  # "1": interpret mode on any backend (tests)


@dataclasses.dataclass(frozen=True)
class Blocks:
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


# Tiles per GPU generation and head dim, forward (backward uses block_q = block_k = the smaller).
# Shared memory in bf16: the q tile (block_q * D * 2 bytes) once, plus a k and a v tile
# (2 * block_k * D * 2 bytes) per pipeline stage. sm_86/sm_89 (RTX 3090/4090, A6000, L40) allow
# 99 KB per block: D = 128 takes 64 x 64 tiles with 2 stages (16 + 2 * 32 = 80 KB); D <= 64
# takes 128 x 64 (16 + 2 * 16 = 48 KB). sm_80 (A100, 163 KB) fits 3 stages of 128 x 64 at
# D = 128 (32 + 3 * 32 = 128 KB) with 8 warps; sm_90 (H100, 227 KB) 3 stages of 128 x 128
# (32 + 3 * 64 = 224 KB). A test checks every entry against these limits.
_TABLE: dict[tuple[str, int], Blocks] = {
  ("sm_80", 32): Blocks(128, 64, 4, 3), ("sm_80", 64): Blocks(128, 64, 4, 3),
  ("sm_80", 128): Blocks(128, 64, 8, 3),
  ("sm_86", 32): Blocks(128, 64, 4, 2), ("sm_86", 64): Blocks(128, 64, 4, 2),
  ("sm_86", 128): Blocks(64, 64, 4, 2),
  ("sm_89", 32): Blocks(128, 64, 4, 2), ("sm_89", 64): Blocks(128, 64, 4, 2),
  ("sm_89", 128): Blocks(64, 64, 4, 2),
  ("sm_90", 32): Blocks(128, 128, 4, 3), ("sm_90", 64): Blocks(128, 128, 8, 3),
  ("sm_90", 128): Blocks(128, 128, 8, 3),
}
_INTERPRET_BLOCKS = Blocks(64, 64, 4, 1)


def device_generation(device: jax.Device) -> str:
  """The GPU generation of `device` as "sm_XY" (its compute capability X.Y)."""
  major, minor = (int(x) for x in str(getattr(device, "compute_capability", "8.0")).split(".")[:2])
  return f"sm_{major}{minor}"


def _table_key(generation: str) -> str:
  major, minor = divmod(int(generation.removeprefix("sm_")), 10)
  if major >= 9:
    return "sm_90"
  if major == 8 and minor >= 9:
    return "sm_89"
  if major == 8 and minor >= 6:
    return "sm_86"
  if major == 8:
    return "sm_80"
  raise ValueError(f"the pallas attention kernel needs an sm_80+ GPU; this one is {generation}"
                   ": use model.attention='xla'")


def choose_blocks(head_dim: int, interpret: bool, generation: str | None = None) -> Blocks:
  """The tile sizes for `head_dim` on GPU `generation` ("sm_90"; default: the running GPU)."""
  if interpret:
    return _INTERPRET_BLOCKS
  if head_dim not in (32, 64, 128):
    raise ValueError(f"head dim {head_dim}: the pallas kernel supports 32, 64 and 128")
  return _TABLE[(_table_key(generation or device_generation(jax.devices()[0])), head_dim)]


def _interpret_mode() -> bool:
  if os.environ.get(INTERPRET_ENV) == "1":
    return True
  if jax.default_backend() != "gpu":
    raise ValueError(
      f"model.attention='pallas' is a CUDA GPU kernel and this run is on "
      f"{jax.default_backend()}: use model.attention='xla' (or 'auto', which picks it)")
  return False


# --- Kernels -------------------------------------------------------------------------------------


def _mask(qseg, kseg, q_pos, k_pos, causal):
  mask = qseg[:, None] == kseg[None, :]
  if causal:
    mask = mask & (q_pos[:, None] >= k_pos[None, :])
  return mask


def _kv_blocks_for_query_block(i, block_q, block_k, n_kv, causal):
  if not causal:
    return n_kv
  return jnp.minimum(pl.cdiv((i + 1) * block_q, block_k), n_kv)


def _key_block(q, qseg, q_pos, k_ref, v_ref, kseg_ref, j, block_k, scale, causal):
  """Key block j: its k and v tiles, the scaled scores q k^T and which of them are visible."""
  start = pl.multiple_of(j * block_k, block_k)
  k = k_ref[pl.ds(start, block_k), :]
  v = v_ref[pl.ds(start, block_k), :]
  kseg = kseg_ref[pl.ds(start, block_k)]
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  mask = _mask(qseg, kseg, q_pos, start + jax.lax.iota(jnp.int32, block_k), causal)
  return k, v, s, mask


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                block_q, block_k, n_kv):
  i = pl.program_id(2)
  q = q_ref[...]
  qseg = qseg_ref[...]
  q_pos = i * block_q + jax.lax.iota(jnp.int32, block_q)
  D = q.shape[-1]

  def body(j, carry):
    m, l, acc = carry
    _, v, s, mask = _key_block(q, qseg, q_pos, k_ref, v_ref, kseg_ref, j, block_k, scale, causal)
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing to see yet
    p = jnp.exp(s - m_ref[:, None])
    alpha = jnp.exp(m - m_ref)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, D), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _kv_blocks_for_query_block(i, block_q, block_k, n_kv, causal),
                                body, init)
  empty = l == 0.0  # padding, or a query whose document has no visible key
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_q, block_k, n_kv):
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  qseg, lse, delta = qseg_ref[...], lse_ref[...], delta_ref[...]
  q_pos = i * block_q + jax.lax.iota(jnp.int32, block_q)

  def body(j, dq):
    k, v, s, mask = _key_block(q, qseg, q_pos, k_ref, v_ref, kseg_ref, j, block_k, scale, causal)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, _kv_blocks_for_query_block(i, block_q, block_k, n_kv, causal), body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, causal, block_q, block_k, n_q):
  j = pl.program_id(2)
  k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]
  k_pos = j * block_k + jax.lax.iota(jnp.int32, block_k)

  def body(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    do = do_ref[pl.ds(start, block_q), :]
    qseg = qseg_ref[pl.ds(start, block_q)]
    lse = lse_ref[pl.ds(start, block_q)]
    delta = delta_ref[pl.ds(start, block_q)]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = _mask(qseg, kseg, start + jax.lax.iota(jnp.int32, block_q), k_pos, causal)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  # Causal: query blocks that end before this key block's first key see none of it.
  first = (j * block_k) // block_q if causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(first, n_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --- pallas_call wrappers ------------------------------------------------------------------------


def _params(blocks: Blocks):
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(q, k, v, qseg, kseg, causal, blocks, interpret):
  B, T, H, D = q.shape
  K = k.shape[2]
  G = H // K
  bq, bk = blocks.block_q, blocks.block_k
  kernel = functools.partial(_fwd_kernel, scale=D**-0.5, causal=causal, block_q=bq, block_k=bk,
                             n_kv=T // bk)
  return pl.pallas_call(
    kernel,
    grid=(B, H, T // bq),
    in_specs=[
      pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h // G, 0)),
      pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h // G, 0)),
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
    ],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
    compiler_params=_params(blocks), interpret=interpret, name="flash_attention_fwd",
  )(q, k, v, qseg, kseg)


def _backward(q, k, v, qseg, kseg, o, lse, do, causal, blocks, interpret):
  B, T, H, D = q.shape
  K = k.shape[2]
  G = H // K
  b = min(blocks.block_q, blocks.block_k)
  bwd_blocks = dataclasses.replace(blocks, block_q=b, block_k=b)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  common = dict(scale=D**-0.5, causal=causal, block_q=b, block_k=b)
  q_block = pl.BlockSpec((None, b, None, D), lambda bb, h, i: (bb, i, h, 0))
  q_whole = pl.BlockSpec((None, T, None, D), lambda bb, h, i: (bb, 0, h, 0))
  kv_whole = pl.BlockSpec((None, T, None, D), lambda bb, h, i: (bb, 0, h // G, 0))
  kv_block = pl.BlockSpec((None, b, None, D), lambda bb, h, j: (bb, j, h // G, 0))
  row_block = pl.BlockSpec((None, None, b), lambda bb, h, i: (bb, h, i))
  row_whole = pl.BlockSpec((None, None, T), lambda bb, h, i: (bb, h, 0))
  seg_block = pl.BlockSpec((None, b), lambda bb, h, i: (bb, i))
  seg_whole = pl.BlockSpec((None, T), lambda bb, h, i: (bb, 0))

  dq = pl.pallas_call(
    functools.partial(_dq_kernel, n_kv=T // b, **common),
    grid=(B, H, T // b),
    in_specs=[q_block, kv_whole, kv_whole, seg_block, seg_whole, q_block, row_block, row_block],
    out_specs=q_block,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(bwd_blocks), interpret=interpret, name="flash_attention_dq",
  )(q, k, v, qseg, kseg, do, lse, delta)

  # dk and dv per query head ([B, T, H, D]), then summed over the G heads of each K/V head.
  per_head = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
  head_block = pl.BlockSpec((None, b, None, D), lambda bb, h, j: (bb, j, h, 0))
  dk_h, dv_h = pl.pallas_call(
    functools.partial(_dkv_kernel, n_q=T // b, **common),
    grid=(B, H, T // b),
    in_specs=[q_whole, kv_block, kv_block, seg_whole, seg_block, q_whole, row_whole, row_whole],
    out_specs=[head_block, head_block],
    out_shape=[per_head, per_head],
    compiler_params=_params(bwd_blocks), interpret=interpret, name="flash_attention_dkv",
  )(q, k, v, qseg, kseg, do, lse, delta)
  dk = dk_h.reshape(B, T, K, G, D).sum(axis=3).astype(k.dtype)
  dv = dv_h.reshape(B, T, K, G, D).sum(axis=3).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qseg, kseg, causal, blocks, interpret):
  return _forward(q, k, v, qseg, kseg, causal, blocks, interpret)[0]


def _flash_fwd(q, k, v, qseg, kseg, causal, blocks, interpret):
  o, lse = _forward(q, k, v, qseg, kseg, causal, blocks, interpret)
  return o, (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(causal, blocks, interpret, res, do):
  q, k, v, qseg, kseg, o, lse = res
  dq, dk, dv = _backward(q, k, v, qseg, kseg, o, lse, do, causal, blocks, interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT=None, causal=True,
                     interpret: bool | None = None, blocks: Blocks | None = None,
                     generation: str | None = None):
  """Flash attention (forward and backward kernels); same contract as the xla reference.

  `generation` ("sm_90") builds the kernels for that GPU without one present, so that any host
  can lower the exact GPU program ahead of time; None builds them for the running GPU.
  """
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if S != T:
    raise ValueError(f"the pallas kernel does self-attention (T == S), got T={T}, S={S}")
  if H % K:
    raise ValueError(f"{H} query heads cannot share {K} K/V heads")
  if interpret is None:
    interpret = generation is None and _interpret_mode()
  blocks = blocks or choose_blocks(E, interpret, generation)
  if E % 16 or (not interpret and E not in (32, 64, 128)):
    raise ValueError(f"head dim {E}: the pallas kernel supports 32, 64 and 128")
  seg = (jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None
         else segment_ids_BxT.astype(jnp.int32))
  size = math.lcm(blocks.block_q, blocks.block_k)
  padded = -(-T // size) * size
  pad = padded - T
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BxTxHxE = jnp.pad(q_BxTxHxE, widths)
    k_BxSxKxE = jnp.pad(k_BxSxKxE, widths)
    v_BxSxKxE = jnp.pad(v_BxSxKxE, widths)
  qseg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_PAD_Q)
  kseg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_PAD_KV)
  out = _flash(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, qseg, kseg, causal, blocks, interpret)
  return out[:, :T]

"""Flash attention for CUDA GPUs in Pallas (Triton backend): GQA, causal, packed documents.

Forward: one program per (batch, query head, block of queries) streams the K/V blocks of its
K/V head (query head h reads K/V head h // (H // K); K and V are never repeated in memory),
keeping an online softmax in float32. Causal attention stops at the diagonal block instead of
masking the blocks above it. Segment ids mask keys of other documents; sequences that are not a
multiple of the block size are padded with segment ids that match nothing, and cut back.

Backward (jax.custom_vjp): the forward saves the log-sum-exp per query; one kernel recomputes
the probabilities per block of queries to get dq, another per block of keys for dk and dv (per
query head, then summed over the heads that share a K/V head). The dk/dv kernel works on the
transposed scores (keys x queries), so no tile is transposed in registers.

Precision: every dot accumulates in float32. bfloat16 and float16 inputs multiply in their own
type; float32 inputs multiply in TF32 on the tensor cores (10-bit mantissa: Triton's float32
dot at the default precision, which the kernel pins, and what XLA uses for float32 matmuls on
Ampere and newer GPUs by default). The tiles of float32 inputs are float32 tiles, sized to fit.

The kernels pass Triton compiler parameters (warps, pipeline stages) explicitly, which makes
Pallas lower through Triton on any CUDA GPU (sm_80 and up) rather than Mosaic GPU (Hopper only).
Tiles come from one table per GPU generation, input dtype and head dim (`_TABLE`); XLA's GPU
compiler builds every entry on a CPU host (`nanollama_jax.kernel_check`). On a CPU
the kernels run only in interpret mode, which the tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanollama_jax import errors, targets

# Segment ids given to padding: padded queries match no key, padded keys no query.
_PAD_Q, _PAD_KV = -2, -1
INTERPRET_ENV = "NANOLLAMA_PALLAS_INTERPRET"  # "1": interpret mode on any backend (tests)
HEAD_DIMS = (32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One kernel's launch: block_q x block_k tiles, warps per program, pipeline stages."""
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The blocks of the three kernels: forward, dq, and dk/dv."""
  fwd: Blocks
  dq: Blocks
  dkv: Blocks

  def seq_multiple(self) -> int:
    """The sequence length every kernel's grid divides (T is padded to a multiple of it)."""
    return math.lcm(*(n for b in (self.fwd, self.dq, self.dkv) for n in (b.block_q, b.block_k)))


# The GPU generations with a row in the table: those targets.GPU_GENERATIONS describes (other
# compute capabilities are served by the row of the generation they behave as, see
# targets.known_gpu_generation).
GENERATIONS = tuple(targets.GPU_GENERATIONS)


def _tiles(fwd, dq, dkv):
  return Tiles(Blocks(*fwd), Blocks(*dq), Blocks(*dkv))


# Tiles per (generation, input dtype, head dim): forward, dq, dk/dv, each (block_q, block_k,
# warps, stages). The rows were sized by pip Triton 3.9.0's estimates (at most 90% of a block's
# shared memory; where several tiles fitted, those that spilled the fewest registers). XLA's own
# GPU compiler builds every entry for its generation (kernel_check; the numbers are in
# docs/attention.md, "Tiles"): none needs more than 81% of its generation's shared memory, and
# none spills but 13 float32 dk/dv kernels (and one dq by 4 bytes), listed there. The rules
# behind the rows:
#   forward  128 queries x 64 keys (64 x 32 at head dim 256; 64 x 64 on sm_120 at 128, where
#            128 x 64 spilled in pip Triton): the q tile stays, K/V stream
#   dq       128 queries x 32 keys: q and do stay, k and v stream (fewer at head dim 256)
#   dk/dv    128 keys x 32 queries at head dim <= 64, 64 x 64 at 128, 32 x 32 at 256: k and v
#            stay, q and do stream (dk and dv accumulate block_k x D floats each, the most
#            registers of any kernel)
#   warps    8 (4 for the smallest float32 tiles); stages 3 where they fit (and did not spill in
#            pip Triton: the sm_90 forward at head dim 256 has 2), else 2
# float32 tiles hold float32 (twice the bytes of bfloat16) and multiply in TF32: smaller tiles,
# especially on the 99 KB GPUs (sm_86, sm_89, sm_120).
_TABLE: dict[tuple[str, str, int], Tiles] = {
  ("sm_80", "bfloat16", 32):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_80", "bfloat16", 64):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_80", "bfloat16", 128):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_80", "bfloat16", 256):  _tiles((64, 32, 8, 3), (32, 32, 8, 3), (32, 32, 8, 3)),
  ("sm_86", "bfloat16", 32):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_86", "bfloat16", 64):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_86", "bfloat16", 128):  _tiles((128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)),
  ("sm_86", "bfloat16", 256):  _tiles((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
  ("sm_89", "bfloat16", 32):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_89", "bfloat16", 64):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_89", "bfloat16", 128):  _tiles((128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)),
  ("sm_89", "bfloat16", 256):  _tiles((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
  ("sm_90", "bfloat16", 32):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_90", "bfloat16", 64):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_90", "bfloat16", 128):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_90", "bfloat16", 256):  _tiles((64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 8, 3)),
  ("sm_100", "bfloat16", 32):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_100", "bfloat16", 64):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_100", "bfloat16", 128): _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_100", "bfloat16", 256): _tiles((64, 32, 8, 3), (64, 32, 8, 3), (32, 32, 8, 3)),
  ("sm_120", "bfloat16", 32):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_120", "bfloat16", 64):  _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3)),
  ("sm_120", "bfloat16", 128): _tiles((64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)),
  ("sm_120", "bfloat16", 256): _tiles((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
  ("sm_80", "float32", 32):    _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 64, 8, 3)),
  ("sm_80", "float32", 64):    _tiles((128, 64, 8, 3), (128, 32, 8, 3), (32, 64, 8, 3)),
  ("sm_80", "float32", 128):   _tiles((64, 32, 8, 3), (64, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_80", "float32", 256):   _tiles((32, 32, 8, 2), (32, 16, 4, 2), (16, 32, 8, 2)),
  ("sm_86", "float32", 32):    _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_86", "float32", 64):    _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_86", "float32", 128):   _tiles((64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
  ("sm_86", "float32", 256):   _tiles((32, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
  ("sm_89", "float32", 32):    _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_89", "float32", 64):    _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_89", "float32", 128):   _tiles((64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
  ("sm_89", "float32", 256):   _tiles((32, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
  ("sm_90", "float32", 32):    _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_90", "float32", 64):    _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_90", "float32", 128):   _tiles((64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 8, 3)),
  ("sm_90", "float32", 256):   _tiles((32, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
  ("sm_100", "float32", 32):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_100", "float32", 64):   _tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
  ("sm_100", "float32", 128):  _tiles((64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 8, 3)),
  ("sm_100", "float32", 256):  _tiles((32, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
  ("sm_120", "float32", 32):   _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_120", "float32", 64):   _tiles((128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)),
  ("sm_120", "float32", 128):  _tiles((64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
  ("sm_120", "float32", 256):  _tiles((32, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
}


def fallback_tiles(dtype: str, head_dim: int) -> Tiles:
  """An unknown GPU's tiles (sm_80 or newer, no row): small, one stage, within 99 KB."""
  b = 16 if dtype == "float32" and head_dim == 256 else 32
  return Tiles(*[Blocks(b, b, 4, 1)] * 3)


_INTERPRET_TILES = Tiles(*[Blocks(64, 64, 4, 1)] * 3)


def table_row(generation: str) -> str | None:
  """The table row serving GPU `generation` ("sm_86"), or None for an unknown newer GPU."""
  if not (generation.startswith("sm_") and generation[3:].isdigit()):
    raise errors.ConfigError(
      f"GPU generation {generation!r}: expected sm_ and the compute capability's "
      "digits, like 'sm_90' for 9.0")
  if int(generation[3:]) < 80:
    raise errors.ConfigError(
      f"the pallas attention kernel needs an sm_80+ GPU; this one is {generation}"
      ": use model.attention='xla'")
  return targets.known_gpu_generation(generation)


def _dtype_key(dtype) -> str:
  name = jnp.dtype(dtype).name
  if name not in ("bfloat16", "float16", "float32"):
    raise errors.ConfigError(
      f"the pallas kernel takes bfloat16, float16 or float32 inputs, got {name}")
  return "bfloat16" if name == "float16" else name  # float16 tiles are bfloat16's: same size


def choose_tiles(head_dim: int, dtype, interpret: bool, generation: str | None = None) -> Tiles:
  """The tiles for `head_dim` and `dtype` on GPU `generation` ("sm_90"; default: this GPU)."""
  if interpret:
    return _INTERPRET_TILES
  if head_dim not in HEAD_DIMS:
    raise errors.ConfigError(f"head dim {head_dim}: the pallas kernel supports {HEAD_DIMS}")
  generation = generation or targets.gpu_generation(
    getattr(jax.devices()[0], "compute_capability", None))
  row = table_row(generation)
  if row is None:
    warnings.warn(f"no pallas attention tiles for GPU generation {generation} (known: "
                  f"{', '.join(GENERATIONS)}): using the smallest safe tiles, which run slowly",
                  stacklevel=3)
    return fallback_tiles(_dtype_key(dtype), head_dim)
  return _TABLE[(row, _dtype_key(dtype), head_dim)]


def interpret_requested() -> bool:
  """Whether $NANOLLAMA_PALLAS_INTERPRET asks for the kernels in Pallas interpret mode."""
  return os.environ.get(INTERPRET_ENV) == "1"


def _interpret_mode() -> bool:
  if interpret_requested():
    return True
  if jax.default_backend() != "gpu":
    raise errors.ConfigError(
      f"model.attention='pallas' is a CUDA GPU kernel and this run is on "
      f"{jax.default_backend()}: use model.attention='xla' (or 'auto', which picks it)")
  return False


# --- Kernels -------------------------------------------------------------------------------------


def _dot(a, b):
  """a @ b in float32; float32 operands multiply in TF32 on the GPU (the module docstring)."""
  return jnp.dot(a, b, precision=lax.Precision.DEFAULT, preferred_element_type=jnp.float32)


def _visible(qseg, kseg, q_pos, k_pos, causal):
  """Which (query, key) pairs attend: same document and, if causal, the key not after the query.

  The arguments broadcast against each other: rows and columns are whatever the caller chose.
  """
  mask = qseg == kseg
  if causal:
    mask = mask & (q_pos >= k_pos)
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
  s = _dot(q, k.T) * scale
  k_pos = start + lax.iota(jnp.int32, block_k)
  return k, v, s, _visible(qseg[:, None], kseg[None, :], q_pos[:, None], k_pos[None, :], causal)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                block_q, block_k, n_kv):
  i = pl.program_id(2)
  q = q_ref[...]
  qseg = qseg_ref[...]
  q_pos = i * block_q + lax.iota(jnp.int32, block_q)
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
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l, acc

  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, D), jnp.float32))
  m, l, acc = lax.fori_loop(0, _kv_blocks_for_query_block(i, block_q, block_k, n_kv, causal),
                            body, init)
  empty = l == 0.0  # padding, or a query whose document has no visible key
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_q, block_k, n_kv):
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  qseg, lse, delta = qseg_ref[...], lse_ref[...], delta_ref[...]
  q_pos = i * block_q + lax.iota(jnp.int32, block_q)

  def body(j, dq):
    k, v, s, mask = _key_block(q, qseg, q_pos, k_ref, v_ref, kseg_ref, j, block_k, scale, causal)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, v.T) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, _kv_blocks_for_query_block(i, block_q, block_k, n_kv, causal), body,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, causal, block_q, block_k, n_q):
  j = pl.program_id(2)
  k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]
  k_pos = j * block_k + lax.iota(jnp.int32, block_k)

  def body(i, carry):
    # Scores and probabilities transposed: keys x queries (the rows are this program's keys).
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    do = do_ref[pl.ds(start, block_q), :]
    qseg = qseg_ref[pl.ds(start, block_q)]
    lse = lse_ref[pl.ds(start, block_q)]
    delta = delta_ref[pl.ds(start, block_q)]
    q_pos = start + lax.iota(jnp.int32, block_q)
    s_t = _dot(k, q.T) * scale
    mask_t = _visible(qseg[None, :], kseg[:, None], q_pos[None, :], k_pos[:, None], causal)
    p_t = jnp.where(mask_t, jnp.exp(s_t - lse[None, :]), 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v, do.T) - delta[None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  # Causal: query blocks that end before this key block's first key see none of it.
  first = (j * block_k) // block_q if causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(first, n_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --- pallas_call wrappers ------------------------------------------------------------------------


def _params(blocks: Blocks):
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(q, k, v, qseg, kseg, causal, tiles, interpret):
  B, T, H, D = q.shape
  G = H // k.shape[2]
  bq, bk = tiles.fwd.block_q, tiles.fwd.block_k
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
    compiler_params=_params(tiles.fwd), interpret=interpret, name="flash_attention_fwd",
  )(q, k, v, qseg, kseg)


def _backward(q, k, v, qseg, kseg, o, lse, do, causal, tiles, interpret):
  B, T, H, D = q.shape
  K = k.shape[2]
  G = H // K
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  scale = D**-0.5
  q_whole = pl.BlockSpec((None, T, None, D), lambda bb, h, i: (bb, 0, h, 0))
  kv_whole = pl.BlockSpec((None, T, None, D), lambda bb, h, i: (bb, 0, h // G, 0))
  row_whole = pl.BlockSpec((None, None, T), lambda bb, h, i: (bb, h, 0))
  seg_whole = pl.BlockSpec((None, T), lambda bb, h, i: (bb, 0))

  bq, bk = tiles.dq.block_q, tiles.dq.block_k
  q_block = pl.BlockSpec((None, bq, None, D), lambda bb, h, i: (bb, i, h, 0))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk,
                      n_kv=T // bk),
    grid=(B, H, T // bq),
    in_specs=[q_block, kv_whole, kv_whole, pl.BlockSpec((None, bq), lambda bb, h, i: (bb, i)),
              seg_whole, q_block, pl.BlockSpec((None, None, bq), lambda bb, h, i: (bb, h, i)),
              pl.BlockSpec((None, None, bq), lambda bb, h, i: (bb, h, i))],
    out_specs=q_block,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(tiles.dq), interpret=interpret, name="flash_attention_dq",
  )(q, k, v, qseg, kseg, do, lse, delta)

  # dk and dv per query head ([B, T, H, D]), then summed over the G heads of each K/V head.
  bq, bk = tiles.dkv.block_q, tiles.dkv.block_k
  kv_block = pl.BlockSpec((None, bk, None, D), lambda bb, h, j: (bb, j, h // G, 0))
  head_block = pl.BlockSpec((None, bk, None, D), lambda bb, h, j: (bb, j, h, 0))
  per_head = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
  dk_h, dv_h = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk,
                      n_q=T // bq),
    grid=(B, H, T // bk),
    in_specs=[q_whole, kv_block, kv_block, seg_whole,
              pl.BlockSpec((None, bk), lambda bb, h, j: (bb, j)), q_whole, row_whole, row_whole],
    out_specs=[head_block, head_block],
    out_shape=[per_head, per_head],
    compiler_params=_params(tiles.dkv), interpret=interpret, name="flash_attention_dkv",
  )(q, k, v, qseg, kseg, do, lse, delta)
  dk = dk_h.reshape(B, T, K, G, D).sum(axis=3).astype(k.dtype)
  dv = dv_h.reshape(B, T, K, G, D).sum(axis=3).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qseg, kseg, causal, tiles, interpret):
  return _forward(q, k, v, qseg, kseg, causal, tiles, interpret)[0]


def _flash_fwd(q, k, v, qseg, kseg, causal, tiles, interpret):
  o, lse = _forward(q, k, v, qseg, kseg, causal, tiles, interpret)
  return o, (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(causal, tiles, interpret, res, do):
  q, k, v, qseg, kseg, o, lse = res
  dq, dk, dv = _backward(q, k, v, qseg, kseg, o, lse, do, causal, tiles, interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT=None, causal=True,
                     interpret: bool | None = None, blocks: Tiles | None = None,
                     generation: str | None = None):
  """Flash attention (forward and backward kernels); same contract as the xla reference.

  `generation` ("sm_90") builds the kernels for that GPU without one present, so that any host
  can lower the exact GPU program ahead of time; None builds them for the running GPU.
  `blocks` overrides the table's tiles.
  """
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if S != T:
    raise ValueError(f"the pallas kernel does self-attention (T == S), got T={T}, S={S}")
  if H % K:
    raise ValueError(f"{H} query heads cannot share {K} K/V heads")
  if interpret is None:
    interpret = generation is None and _interpret_mode()
  if E % 16 or (not interpret and E not in HEAD_DIMS):
    raise ValueError(f"head dim {E}: the pallas kernel supports {HEAD_DIMS}")
  tiles = blocks or choose_tiles(E, q_BxTxHxE.dtype, interpret, generation)
  seg = (jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None
         else segment_ids_BxT.astype(jnp.int32))
  size = tiles.seq_multiple()
  pad = -(-T // size) * size - T
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BxTxHxE = jnp.pad(q_BxTxHxE, widths)
    k_BxSxKxE = jnp.pad(k_BxSxKxE, widths)
    v_BxSxKxE = jnp.pad(v_BxSxKxE, widths)
  qseg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_PAD_Q)
  kseg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_PAD_KV)
  out = _flash(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, qseg, kseg, causal, tiles, interpret)
  return out[:, :T]

"""A LLaMA decoder in Flax NNX: RMSNorm, RoPE (+ Llama 3.1 scaling), GQA attention, SwiGLU.

Array names carry their shapes. B batch, T sequence length, D model dim (`dim`), H query heads,
K key/value heads, E head dim (D // H), F SwiGLU hidden dim (`ffn_dim`), V vocabulary, L layers.

Layout decisions that export and checkpoints rely on:
- Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used;
  norms, softmax and the logits are computed in float32.
- The decoder layers are one module whose parameters carry a leading L axis (logical name
  `layers`), whether they run with a scan or a Python loop, so both give the same checkpoint.
- RoPE uses the half-split layout: feature i of a head is rotated with feature i + E/2 (the
  layout of Hugging Face Llama, so its q/k weights need no permutation on export).
- Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
  `vocab`, `layers`) that sharding.py maps onto the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nanollama_jax import config as config_lib
from nanollama_jax import sharding
from nanollama_jax.attention import Platform, attention
from nanollama_jax.attention.xla import cached_attention

# What each model.remat policy (config.REMAT_POLICIES names them) keeps for the backward pass;
# "none" applies no remat at all.
_REMAT_SAVES: dict[str, Callable[..., bool] | None] = {
  "full": None,  # save nothing: recompute the whole layer in the backward pass
  # keep the matmul outputs against weights (projections, MLP), recompute the rest
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # keep only each layer's attention output: the attention core, quadratic in the sequence,
  # is not recomputed, the projections and the MLP are
  "save_attn": jax.checkpoint_policies.save_only_these_names("attn_out"),
  "save_dots_attn": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("attn_out")),
}
assert set(_REMAT_SAVES) | {"none"} == set(config_lib.REMAT_POLICIES)


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: tuple[str, ...],
           dtype: Any) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, dtype=dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32."""

  def __init__(self, size: int, eps: float, axis_name: str, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((size,), param_dtype), out_sharding=(axis_name,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """The E/2 inverse frequencies theta^(-2i/E), optionally with the Llama 3.1 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_context = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, and the band in
  # between interpolates linearly in old_context / wavelen.
  smooth = jnp.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def dense(x_BxTxI: jax.Array, w_IxO: jax.Array, out_dtype: Any = None) -> jax.Array:
  """x @ w over the last axis, as one 2-D matmul of the B*T tokens.

  The same dot on every backend. Flattening the tokens matters to XLA's CPU backend: the weight
  gradient of a 3-D einsum contracts two axes (B, T), which it lowers with a transposed copy of
  the activations and of their gradient; a 2-D dot's single contracting axis needs none (the
  SwiGLU forward and backward run about 2x faster on a CPU).
  """
  B, T, I = x_BxTxI.shape
  out_NxO = jnp.matmul(x_BxTxI.reshape(B * T, I), w_IxO, preferred_element_type=out_dtype)
  return out_NxO.reshape(B, T, w_IxO.shape[-1])


def apply_rope(x_BxTxNxE: jax.Array, sin_BxTxE2: jax.Array, cos_BxTxE2: jax.Array) -> jax.Array:
  """Rotates feature pairs (i, i + E/2) of every head by position * frequency_i."""
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin_BxTxE2[:, :, None, :], cos_BxTxE2[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and optional QK-norm."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, target: Platform | None):
    D, H, K = model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads
    E = config_lib.head_dim(model_cfg)
    std, pd = model_cfg.init_std, jnp.dtype(model_cfg.param_dtype)
    self.dtype, self.impl, self.target = jnp.dtype(model_cfg.dtype), model_cfg.attention, target
    self.wq_DxHxE = _param(rngs, std, (D, H, E), ("embed", "heads", "head_dim"), pd)
    self.wk_DxKxE = _param(rngs, std, (D, K, E), ("embed", "kv_heads", "head_dim"), pd)
    self.wv_DxKxE = _param(rngs, std, (D, K, E), ("embed", "kv_heads", "head_dim"), pd)
    out_std = std / math.sqrt(2 * model_cfg.n_layers)
    self.wo_HxExD = _param(rngs, out_std, (H, E, D), ("heads", "head_dim", "embed"), pd)
    self.q_norm = RMSNorm(E, model_cfg.norm_eps, "head_dim", pd) if model_cfg.qk_norm else None
    self.k_norm = RMSNorm(E, model_cfg.norm_eps, "head_dim", pd) if model_cfg.qk_norm else None

  def __call__(self, x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT, cache=None):
    """With `cache` (this layer's k_BxKxSxE, v_BxKxSxE, slot, mask_BxTxS), the new keys and
    values are written at cache slots [slot, slot + T), the queries attend over the cache under
    the mask, and (out, (k, v)) is returned. A mask of None is a prefill of an empty cache: the
    queries attend to the new tokens alone, under `segment_ids_BxT` (0 for left padding)."""
    dt = self.dtype
    B, T, D = x_BxTxD.shape
    _, H, E = self.wq_DxHxE.shape
    K = self.wk_DxKxE.shape[1]
    q_BxTxHxE = dense(x_BxTxD, self.wq_DxHxE[...].astype(dt).reshape(D, H * E)).reshape(B, T, H, E)
    k_BxTxKxE = dense(x_BxTxD, self.wk_DxKxE[...].astype(dt).reshape(D, K * E)).reshape(B, T, K, E)
    v_BxTxKxE = dense(x_BxTxD, self.wv_DxKxE[...].astype(dt).reshape(D, K * E)).reshape(B, T, K, E)
    if self.q_norm is not None:
      q_BxTxHxE, k_BxTxKxE = self.q_norm(q_BxTxHxE), self.k_norm(k_BxTxKxE)
    q_BxTxHxE = apply_rope(q_BxTxHxE, sin_BxTxE2, cos_BxTxE2)
    k_BxTxKxE = apply_rope(k_BxTxKxE, sin_BxTxE2, cos_BxTxE2)
    if cache is None or cache[-1] is None:
      # Training, evaluation, and a prefill (the prompt attends to itself): the kernels' path.
      out_BxTxHxE = attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, impl=self.impl,
                              target=self.target)
    if cache is not None:
      k_BxKxSxE, v_BxKxSxE, slot, mask_BxTxS = cache
      # Only the new entries are written (heads before slots, as the attention over the cache
      # reads them: no transposed copy of it per token).
      k_BxKxSxE, v_BxKxSxE = (_write_slots(c, x.transpose(0, 2, 1, 3), slot)
                              for c, x in ((k_BxKxSxE, k_BxTxKxE), (v_BxKxSxE, v_BxTxKxE)))
      if mask_BxTxS is not None:
        out_BxTxHxE = cached_attention(q_BxTxHxE, k_BxKxSxE.astype(dt), v_BxKxSxE.astype(dt),
                                       mask_BxTxS)
    out_BxTxHxE = checkpoint_name(out_BxTxHxE, "attn_out")
    out_BxTxD = dense(out_BxTxHxE.reshape(B, T, H * E),
                      self.wo_HxExD[...].astype(dt).reshape(H * E, D))
    return out_BxTxD if cache is None else (out_BxTxD, (k_BxKxSxE, v_BxKxSxE))


def _write_slots(cache_BxKxSxE: jax.Array, new_BxKxTxE: jax.Array, slot: jax.Array) -> jax.Array:
  """The cache with `new_BxKxTxE` written at slots [slot, slot + T)."""
  cache_BxKxSxE = jax.lax.dynamic_update_slice_in_dim(
    cache_BxKxSxE, new_BxKxTxE.astype(cache_BxKxSxE.dtype), slot, axis=2)
  return sharding.constrain(cache_BxKxSxE, CACHE_AXES[1:])


class MLP(nnx.Module):
  """SwiGLU: (silu(x W_gate) * x W_up) W_down."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    D, F = model_cfg.dim, model_cfg.ffn_dim
    std, pd = model_cfg.init_std, jnp.dtype(model_cfg.param_dtype)
    self.dtype = jnp.dtype(model_cfg.dtype)
    self.w_gate_DxF = _param(rngs, std, (D, F), ("embed", "mlp"), pd)
    self.w_up_DxF = _param(rngs, std, (D, F), ("embed", "mlp"), pd)
    out_std = std / math.sqrt(2 * model_cfg.n_layers)
    self.w_down_FxD = _param(rngs, out_std, (F, D), ("mlp", "embed"), pd)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = self.dtype
    gate_BxTxF = jax.nn.silu(dense(x_BxTxD, self.w_gate_DxF[...].astype(dt)))
    up_BxTxF = dense(x_BxTxD, self.w_up_DxF[...].astype(dt))
    return dense(gate_BxTxF * up_BxTxF, self.w_down_FxD[...].astype(dt))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, target: Platform | None):
    pd = jnp.dtype(model_cfg.param_dtype)
    self.attn_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps, "embed", pd)
    self.attn = Attention(model_cfg, rngs, target)
    self.mlp_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps, "embed", pd)
    self.mlp = MLP(model_cfg, rngs)

  def __call__(self, x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT, cache=None):
    attn_out = self.attn(self.attn_norm(x_BxTxD), sin_BxTxE2, cos_BxTxE2, segment_ids_BxT, cache)
    if cache is not None:
      attn_out, new_cache = attn_out
    x_BxTxD = x_BxTxD + attn_out
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD if cache is None else (x_BxTxD, new_cache)


_RESIDUAL = ("batch", "length", "embed")  # the residual stream's logical axes
# The KV cache's logical axes, [L, B, K, S, E]: rows split like the batch, K/V heads over the
# tensor axis where they divide it, like the model's K/V projections.
CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


class Llama(nnx.Module):
  """Token embedding, L decoder layers (stacked parameters), final norm, output projection.

  `target` is the platform the attention is built for (see attention.Platform); None: the running
  devices, looked up when the model is traced.
  """

  def __init__(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
               target: Platform | None = None):
    # a frozen copy: later edits of the caller's `model_cfg` cannot leak in
    self.model_cfg = ml_collections.FrozenConfigDict(model_cfg)
    pd = jnp.dtype(model_cfg.param_dtype)
    V, D = model_cfg.vocab_size, model_cfg.dim
    self.embed_VxD = _param(rngs, model_cfg.init_std, (V, D), ("vocab", "embed"), pd)

    @nnx.split_rngs(splits=model_cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(model_cfg, rngs, target)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps, "embed", pd)
    self.lm_head_DxV = None if model_cfg.tie_embeddings else _param(
      rngs, model_cfg.init_std, (D, V), ("embed", "vocab"), pd)

  def __call__(
    self,
    tokens_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    cache: dict | None = None,
    prefill: bool = False,
    layer_params: list | None = None,
  ) -> jax.Array | tuple[jax.Array, dict]:
    """Returns float32 logits; segment ids and positions describe packed documents.

    Positions must lie below max(model.max_seq_len, T, the cache's length): RoPE looks them up
    in a table that long, and a position past its end makes the sequence's logits NaN.

    With a KV cache (see `init_cache`), the tokens are written at its `slot`, attend to what
    the cache holds under its key mask, and (the last position's logits_BxV, updated cache) is
    returned. `prefill`: the cache is empty and the tokens start at slot 0; they attend to each
    other through the attention kernels, the left padding (invalid slots) kept apart.
    `layer_params`: for a model that loops over its layers, each layer's parameters sliced
    once (see `unstacked_layers`) instead of at every call.
    """
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if cache is None:
      x_BxTxD = self.features(tokens_BxT, segment_ids_BxT, positions_BxT)
      return output_logits(x_BxTxD, self.head(), jnp.dtype(self.model_cfg.dtype))
    sin_BxTxE2, cos_BxTxE2 = self._rope(
      positions_BxT, max(self.model_cfg.max_seq_len, T, cache["valid_BxS"].shape[1]))
    x_BxTxD = sharding.constrain(self._embed(tokens_BxT), _RESIDUAL)
    x_BxTxD, cache = self._layers_with_cache(x_BxTxD, sin_BxTxE2, cos_BxTxE2, cache, prefill,
                                             layer_params)
    # Sampling reads the last position's logits: a prefill computes no [B, T, V].
    return self._logits(x_BxTxD[:, -1:])[:, 0], cache

  def _rope(self, positions_BxT: jax.Array, n_positions: int) -> tuple[jax.Array, jax.Array]:
    """sin and cos of every token's rotation angles, looked up in a table of `n_positions`.

    XLA fuses the lookup into the rotation of q and k as a plain load; from the positions
    directly it fused sin and cos into every rotation (and its gradient), recomputing them for
    each head (on a CPU that took about 8% of a TinyStories-sized train step). An optimization
    barrier does not stop it: XLA drops the barrier before fusing. Positions are exact in
    float32 below 2^24, so the table's angles are the same numbers as per-token ones.
    """
    model_cfg = self.model_cfg
    rope_scaling = None if model_cfg.rope_scaling is None else dict(model_cfg.rope_scaling)
    inv_freq_E2 = rope_frequencies(config_lib.head_dim(model_cfg), model_cfg.rope_theta,
                                   rope_scaling)
    angles_PxE2 = jnp.arange(n_positions, dtype=jnp.float32)[:, None] * inv_freq_E2
    return (jnp.take(jnp.sin(angles_PxE2), positions_BxT, axis=0),
            jnp.take(jnp.cos(angles_PxE2), positions_BxT, axis=0))

  def _layers(self, x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT) -> jax.Array:
    """The decoder stack for training and evaluation: a scan or a loop, remat as configured."""
    model_cfg = self.model_cfg
    layer_def, layer_state = nnx.split(self.layers)

    def layer_step(x_BxTxD, state):
      layer = nnx.merge(layer_def, state)
      x_BxTxD = layer(x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT)
      return sharding.constrain(x_BxTxD, _RESIDUAL), None

    if model_cfg.remat != "none":
      layer_step = jax.checkpoint(layer_step, policy=_REMAT_SAVES[model_cfg.remat])
    if model_cfg.scan_layers:
      return jax.lax.scan(layer_step, x_BxTxD, layer_state)[0]
    for state in _per_layer(layer_state, model_cfg.n_layers):
      x_BxTxD, _ = layer_step(x_BxTxD, state)
    return x_BxTxD

  def _layers_with_cache(self, x_BxTxD, sin_BxTxE2, cos_BxTxE2, cache: dict, prefill: bool,
                         layer_params: list | None) -> tuple[jax.Array, dict]:
    """The decoder stack over a KV cache: query t sits in slot `slot + t` and sees the valid
    keys up to that slot. A scan or a loop over the layers, as in training."""
    layer_def, layer_state = nnx.split(self.layers)
    T, S = x_BxTxD.shape[1], cache["valid_BxS"].shape[1]
    if prefill:
      mask_BxTxS, segment_ids_BxT = None, cache["valid_BxS"][:, :T].astype(jnp.int32)
    else:
      query_slot_T = cache["slot"] + jnp.arange(T)
      mask_BxTxS = cache["valid_BxS"][:, None, :] & (
        jnp.arange(S)[None, None, :] <= query_slot_T[None, :, None])
      segment_ids_BxT = None

    def cached_step(x_BxTxD, state, k_BxKxSxE, v_BxKxSxE):
      layer = nnx.merge(layer_def, state)
      x_BxTxD, kv = layer(x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT,
                          (k_BxKxSxE, v_BxKxSxE, cache["slot"], mask_BxTxS))
      return sharding.constrain(x_BxTxD, _RESIDUAL), kv

    if self.model_cfg.scan_layers:
      x_BxTxD, (k, v) = jax.lax.scan(lambda x, xs: cached_step(x, *xs), x_BxTxD,
                                     (layer_state, cache["k"], cache["v"]))
      k, v = sharding.constrain(k, CACHE_AXES), sharding.constrain(v, CACHE_AXES)
    else:
      k, v = [], []
      if layer_params is None:
        layer_params = _per_layer(layer_state, self.model_cfg.n_layers)
      for i, state in enumerate(layer_params):
        x_BxTxD, (k_i, v_i) = cached_step(x_BxTxD, state, cache["k"][i], cache["v"][i])
        k.append(k_i)
        v.append(v_i)
    return x_BxTxD, {**cache, "k": k, "v": v, "slot": cache["slot"] + T}

  def features(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
    """The final-normed residual stream of a packed batch: what the output layer reads."""
    sin_BxTxE2, cos_BxTxE2 = self._rope(positions_BxT, max(self.model_cfg.max_seq_len,
                                                            tokens_BxT.shape[1]))
    x_BxTxD = sharding.constrain(self._embed(tokens_BxT), _RESIDUAL)
    return self.final_norm(self._layers(x_BxTxD, sin_BxTxE2, cos_BxTxE2, segment_ids_BxT))

  def _embed(self, tokens_BxT: jax.Array) -> jax.Array:
    """The tokens' embeddings in the compute dtype."""
    return jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(jnp.dtype(self.model_cfg.dtype))

  def head(self) -> jax.Array:
    """The output projection head_DxV (the embedding, transposed, when tied)."""
    return self.embed_VxD[...].T if self.lm_head_DxV is None else self.lm_head_DxV[...]

  def _logits(self, x_BxTxD: jax.Array) -> jax.Array:
    return output_logits(self.final_norm(x_BxTxD), self.head(), jnp.dtype(self.model_cfg.dtype))


def output_logits(x_BxTxD: jax.Array, head_DxV: jax.Array, dtype: Any) -> jax.Array:
  """float32 logits of the output layer, the matmul in the compute `dtype`."""
  logits_BxTxV = dense(x_BxTxD.astype(dtype), head_DxV.astype(dtype), jnp.float32)
  return sharding.constrain(logits_BxTxV, ("batch", "length", "vocab"))


def param_count(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def layer_matmul_param_count(model_cfg: ml_collections.ConfigDict) -> int:
  """The matmul weights of one decoder layer: the q, k, v and output projections and the
  SwiGLU's three matrices (what its FLOPs scale with; metrics.model_flops_per_token)."""
  D, F, H, K = model_cfg.dim, model_cfg.ffn_dim, model_cfg.n_heads, model_cfg.n_kv_heads
  E = config_lib.head_dim(model_cfg)
  return 2 * D * H * E + 2 * D * K * E + 3 * D * F


def param_count_formula(model_cfg: ml_collections.ConfigDict) -> int:
  """The closed-form parameter count of a model config (no model is built)."""
  D, L = model_cfg.dim, model_cfg.n_layers
  qk_norm = 2 * config_lib.head_dim(model_cfg) if model_cfg.qk_norm else 0
  layer = layer_matmul_param_count(model_cfg) + qk_norm + 2 * D  # + the two RMSNorm scales
  return embedding_param_count(model_cfg) + L * layer + D


def embedding_param_count(model_cfg: ml_collections.ConfigDict) -> int:
  """Parameters in the token embedding and, when untied, the output projection."""
  return model_cfg.vocab_size * model_cfg.dim * (1 if model_cfg.tie_embeddings else 2)


def _abstract(model_cfg: ml_collections.ConfigDict, target: Platform | None = None) -> Llama:
  return nnx.eval_shape(lambda: Llama(model_cfg, nnx.Rngs(params=0), target))


def graph(model_cfg: ml_collections.ConfigDict, target: Platform | None = None) -> nnx.GraphDef:
  """The static structure of the model for `target` (default: the running devices), to pass to
  `apply`; builds no arrays."""
  return nnx.graphdef(_abstract(model_cfg, target))


def logical_axes(model_cfg: ml_collections.ConfigDict) -> dict:
  """A tree like the parameters holding each parameter's logical axis names."""
  return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(_abstract(model_cfg))))


def init_params(model_cfg: ml_collections.ConfigDict, seed: int) -> dict:
  """Initialised parameters as a nested dict of arrays, created inside jit."""
  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(model_cfg, nnx.Rngs(params=seed)))))()


def abstract_params(model_cfg: ml_collections.ConfigDict) -> dict:
  """The parameters' shapes and dtypes (ShapeDtypeStructs); nothing is computed or allocated."""
  return jax.eval_shape(lambda: init_params(model_cfg, 0))


def apply(graphdef: nnx.GraphDef, params: dict, tokens_BxT: jax.Array,
          segment_ids_BxT: jax.Array | None = None,
          positions_BxT: jax.Array | None = None) -> jax.Array:
  """Runs the model `graphdef` with `params`; returns float32 logits_BxTxV."""
  return nnx.merge(graphdef, params)(tokens_BxT, segment_ids_BxT, positions_BxT)


def init_cache(model_cfg: ml_collections.ConfigDict, valid_BxS: jax.Array) -> dict:
  """An empty KV cache for len(valid_BxS) rows of S slots; valid_BxS marks the slots that may
  be attended to (False for left padding of shorter prompts). Under a mesh, split as the model
  is (see CACHE_AXES).

  A model that scans its layers keeps one [L, B, K, S, E] array each for keys and values (the
  scan reads and writes a layer's slice); one that loops over them keeps a list of L [B, K, S,
  E] arrays, so that each layer's new entries are written in place: XLA copies a whole stacked
  cache to update one layer's slice that the layer then reads, each token.
  """
  B, S = valid_BxS.shape
  shape = (B, model_cfg.n_kv_heads, S, config_lib.head_dim(model_cfg))
  if model_cfg.scan_layers:
    zeros = sharding.constrain(jnp.zeros((model_cfg.n_layers, *shape), jnp.dtype(model_cfg.dtype)),
                               CACHE_AXES)
  else:
    zeros = [sharding.constrain(jnp.zeros(shape, jnp.dtype(model_cfg.dtype)), CACHE_AXES[1:])
             for _ in range(model_cfg.n_layers)]
  return {"k": zeros, "v": zeros, "slot": jnp.zeros((), jnp.int32),
          "valid_BxS": sharding.constrain(valid_BxS, ("batch", "length"))}


def grow_cache(cache: dict, valid_BxS: jax.Array) -> dict:
  """The cache lengthened to len(valid_BxS[0]) slots: its entries kept, the new slots empty."""
  def grow(x):
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, valid_BxS.shape[1] - x.shape[-2])
    return sharding.constrain(jnp.pad(x, pad), CACHE_AXES[-x.ndim:])
  return {**cache, "k": jax.tree.map(grow, cache["k"]), "v": jax.tree.map(grow, cache["v"]),
          "valid_BxS": sharding.constrain(valid_BxS, ("batch", "length"))}


def cache_axes(cache: dict) -> dict:
  """The logical axes of every array of a KV cache (a tree like it)."""
  return {"k": jax.tree.map(lambda x: CACHE_AXES[-x.ndim:], cache["k"]),
          "v": jax.tree.map(lambda x: CACHE_AXES[-x.ndim:], cache["v"]), "slot": (),
          "valid_BxS": ("batch", "length")}


def apply_with_cache(graphdef: nnx.GraphDef, params: dict, tokens_BxT: jax.Array,
                     positions_BxT: jax.Array, cache: dict, prefill: bool = False,
                     layer_params: list | None = None) -> tuple[jax.Array, dict]:
  """Runs `tokens_BxT` at `positions_BxT` against `cache`; returns (the last position's float32
  logits_BxV, cache). `prefill`: the first call on an empty cache; `layer_params`: see
  `unstacked_layers` (both in Llama.__call__)."""
  return nnx.merge(graphdef, params)(tokens_BxT, None, positions_BxT, cache, prefill,
                                     layer_params)


def unstacked_layers(model_cfg: ml_collections.ConfigDict, params: dict) -> list | None:
  """Each layer's parameters, for a decoding loop of a model that loops over its layers (None
  for one that scans them). Sliced once before the loop: XLA copies a layer's weights out of
  the stacked arrays wherever they are sliced, and inside the loop that is every weight at
  every token."""
  if model_cfg.scan_layers:
    return None
  return _per_layer(params["layers"], model_cfg.n_layers)


def _per_layer(stacked: Any, n_layers: int) -> list:
  """Layer i's slice of every array of a tree with a leading L axis, for i < n_layers."""
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers)]

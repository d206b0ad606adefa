"""The optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at the last step.

  Steps count from 0: step `warmup_steps - 1` runs at the peak and step `total_steps - 1` at
  `min_lr`; the first step already has a non-zero rate (lr / warmup_steps).
  """
  peak, floor, warmup = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps
  decay_steps = max(1, total_steps - 1 - warmup)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(1, warmup))
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def decay_mask(params: dict) -> dict:
  """True for the parameters that get weight decay: every one but the norms' scales."""
  def decays(path, _) -> bool:
    return not any("norm" in str(getattr(k, "key", k)) for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """The optax chain for `optim_cfg` (the optim group) and a run of `total_steps` steps."""
  adamw = optax.adamw(
    lr_schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay, mask=decay_mask,
  )
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
  return adamw

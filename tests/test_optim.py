"""The learning-rate schedule and AdamW's weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanollama_jax import config, model, optim


def optim_cfg(**overrides):
  cfg = config.get_default_config().optim
  cfg.update(dict(lr=6e-4, min_lr=3e-5, warmup_steps=10))
  cfg.update(overrides)
  return cfg


def test_schedule_values():
  schedule = optim.lr_schedule(optim_cfg(), total_steps=110)
  assert float(schedule(0)) == pytest.approx(6e-5)  # lr / warmup: the first step learns
  assert float(schedule(4)) == pytest.approx(3e-4)
  assert float(schedule(9)) == pytest.approx(6e-4)  # warmup ends at the peak
  assert float(schedule(10)) == pytest.approx(6e-4)
  # Middle of the cosine (step 10 + 99 / 2): halfway between peak and floor.
  assert float(schedule(59.5)) == pytest.approx((6e-4 + 3e-5) / 2, rel=1e-5)
  quarter = 3e-5 + 0.5 * (6e-4 - 3e-5) * (1 + math.cos(math.pi * 0.25))
  assert float(schedule(10 + 99 / 4)) == pytest.approx(quarter, rel=1e-5)
  assert float(schedule(109)) == pytest.approx(3e-5)  # the last step runs at min_lr
  assert float(schedule(500)) == pytest.approx(3e-5)
  steps = np.arange(10, 110)
  assert np.all(np.diff(np.asarray(schedule(steps))) <= 0)


def test_schedule_without_warmup_starts_at_peak():
  schedule = optim.lr_schedule(optim_cfg(warmup_steps=0), total_steps=11)
  assert float(schedule(0)) == pytest.approx(6e-4)
  assert float(schedule(10)) == pytest.approx(3e-5)


def test_decay_mask_skips_norms_only():
  cfg = config.get_default_config().model
  cfg.update(dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24,
                  qk_norm=True))
  params = model.init_params(cfg, 0)
  mask = optim.decay_mask(params)
  assert mask["embed_VxD"] and mask["lm_head_DxV"] and mask["layers"]["attn"]["wq_DxHxE"]
  assert mask["layers"]["mlp"]["w_down_FxD"]
  assert not mask["final_norm"]["scale"] and not mask["layers"]["attn_norm"]["scale"]
  assert not mask["layers"]["attn"]["q_norm"]["scale"]
  assert sum(jax.tree.leaves(mask)) == 9 and len(jax.tree.leaves(mask)) == 14


def test_weight_decay_applies_where_masked():
  """With zero gradients AdamW only decays: w <- w - lr * wd * w, and norms stay put."""
  cfg = optim_cfg(warmup_steps=0, lr=1e-2, min_lr=1e-2, weight_decay=0.1)
  params = {"w": jnp.full((3,), 2.0), "norm": {"scale": jnp.full((3,), 2.0)}}
  tx = optim.make_optimizer(cfg, total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], 2.0 - 1e-2 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(new["norm"]["scale"], 2.0)


def test_clipping_rescales_gradients_by_their_global_norm():
  """Clipping at 1.0 equals feeding the unclipped optimizer pre-scaled gradients."""
  g1 = {"w": jnp.array([30.0, 40.0, 0.0]), "b": jnp.zeros((2,))}  # global norm 50
  g2 = {"w": jnp.array([0.3, -0.4, 0.0]), "b": jnp.zeros((2,))}  # norm 0.5: left alone
  params = jax.tree.map(jnp.zeros_like, g1)

  def run(grad_clip, grads_seq):
    tx = optim.make_optimizer(optim_cfg(warmup_steps=0, weight_decay=0.0, grad_clip=grad_clip),
                              total_steps=10)
    state, p = tx.init(params), params
    for g in grads_seq:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p["w"]

  clipped = run(1.0, [g1, g2])
  np.testing.assert_allclose(clipped, run(0.0, [jax.tree.map(lambda g: g / 50, g1), g2]),
                             rtol=1e-6)
  assert np.abs(np.asarray(clipped - run(0.0, [g1, g2]))).max() > 1e-6

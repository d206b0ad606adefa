"""The Pallas flash-attention kernel (interpret mode on the CPU) against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanollama_jax import attention as attention_lib
from nanollama_jax.attention import pallas
from nanollama_jax.attention.xla import xla_attention


def inputs(T, H, K, D, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (2, T, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (2, T, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (2, T, K, D), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (2, T, H, D), jnp.float32).astype(dtype)
  return q, k, v, do


def packed_segments(T):
  """Row 0: three documents of uneven lengths; row 1: one document."""
  row0 = 1 + (np.arange(T) >= T // 3 + 5) + (np.arange(T) >= 2 * T // 3 - 7)
  return jnp.asarray(np.stack([row0, np.ones(T)]).astype(np.int32))


def value_and_grads(impl, q, k, v, do, segments, causal):
  def loss(q, k, v):
    return jnp.sum(impl(q, k, v, segments, causal).astype(jnp.float32) * do.astype(jnp.float32))
  out = impl(q, k, v, segments, causal)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def kernel(q, k, v, segments, causal):
  return pallas.pallas_attention(q, k, v, segments, causal, interpret=True)


# Every value of each axis appears, in combinations chosen to keep interpret mode fast.
CASES = [
  # T, H, K, D, causal, segments
  (128, 8, 8, 32, True, False),
  (128, 8, 2, 64, True, True),
  (256, 6, 1, 128, True, True),
  (256, 8, 8, 64, False, True),
  (384, 8, 2, 32, False, False),
  (384, 6, 1, 64, True, True),
  (100, 8, 2, 32, True, True),  # not a multiple of the block: padded and cut back
]


@pytest.mark.parametrize("T, H, K, D, causal, segmented", CASES)
def test_kernel_matches_the_reference_in_float32(T, H, K, D, causal, segmented):
  q, k, v, do = inputs(T, H, K, D, jnp.float32)
  seg = packed_segments(T) if segmented else None
  out, grads = value_and_grads(jax.jit(kernel, static_argnums=4), q, k, v, do, seg, causal)
  ref, ref_grads = value_and_grads(xla_attention, q, k, v, do, seg, causal)
  errors = [float(jnp.abs(a - b).max()) for a, b in zip((out, *grads), (ref, *ref_grads))]
  print(f"T={T} H={H} K={K} D={D} causal={causal} segments={segmented}: max error "
        f"out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} dv {errors[3]:.1e}")
  assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("T, H, K, D, causal, segmented", [CASES[1], CASES[5]])
def test_kernel_matches_the_reference_in_bfloat16(T, H, K, D, causal, segmented):
  q, k, v, do = inputs(T, H, K, D, jnp.bfloat16)
  seg = packed_segments(T) if segmented else None
  out, grads = value_and_grads(kernel, q, k, v, do, seg, causal)
  # The reference in float32 on the same bfloat16 inputs.
  ref, ref_grads = value_and_grads(xla_attention, *(x.astype(jnp.float32) for x in (q, k, v, do)),
                                   seg, causal)
  for a, b in zip((out, *grads), (ref, *ref_grads)):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 2e-2 * max(scale, 1.0)


def test_query_heads_read_their_own_kv_head():
  """With 8 query heads on 2 K/V heads, head h must read K/V head h // 4, not h % 2."""
  q, k, v, _ = inputs(128, 8, 2, 32, jnp.float32, seed=1)
  out = kernel(q, k, v, None, True)
  right = xla_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), None, True)
  wrong = xla_attention(q, jnp.tile(k, (1, 1, 4, 1)), jnp.tile(v, (1, 1, 4, 1)), None, True)
  assert float(jnp.abs(out - right).max()) < 1e-5
  assert float(jnp.abs(out - wrong).max()) > 0.1


def test_documents_do_not_see_each_other():
  q, k, v, _ = inputs(128, 4, 2, 32, jnp.float32, seed=2)
  seg = packed_segments(128)
  out = kernel(q, k, v, seg, True)
  # Changing the second document's keys and values leaves the first one's outputs alone.
  first = int((np.asarray(seg[0]) == 1).sum())
  k2 = k.at[0, first:].add(1.0)
  v2 = v.at[0, first:].add(1.0)
  out2 = kernel(q, k2, v2, seg, True)
  np.testing.assert_array_equal(np.asarray(out[0, :first]), np.asarray(out2[0, :first]))
  assert float(jnp.abs(out[0, first:] - out2[0, first:]).max()) > 0.1


def test_block_table_fits_shared_memory_and_cpu_runs_are_refused(monkeypatch):
  limits = {"sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90": 227}  # KB of shared memory
  for (gen, dim), b in pallas._TABLE.items():
    q_kb = b.block_q * dim * 2 / 1024  # the bf16 q tile, loaded once
    kv_kb = 2 * b.block_k * dim * 2 / 1024  # a k and a v tile, one pair per pipeline stage
    assert q_kb + b.num_stages * kv_kb <= limits[gen], (gen, dim, b)
  monkeypatch.delenv(pallas.INTERPRET_ENV, raising=False)
  q, k, v, _ = inputs(64, 2, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="CUDA GPU kernel and this run is on cpu: use "
                                       "model.attention='xla'"):
    attention_lib.attention(q, k, v, impl="pallas")
  assert attention_lib.resolve("auto") == "xla"
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    attention_lib.attention(q, k, v, impl="cudnn")


def test_three_training_steps_with_the_kernel_match_xla(sample_dir, tokenizer_path, monkeypatch):
  from nanollama_jax import config, model, optim, train
  from nanollama_jax.data import pipeline
  from nanollama_jax.data.tokenizer import Tokenizer
  monkeypatch.setenv(pallas.INTERPRET_ENV, "1")
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=128, max_seq_len=64))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"), tokenizer=str(tokenizer_path),
                       seq_len=64, batch_size=4))
  cfg.optim.update(dict(lr=3e-3, warmup_steps=1))
  batches = pipeline.train_batches(cfg.data, Tokenizer(str(tokenizer_path)))
  batches = [next(batches) for _ in range(3)]
  losses = {}
  for impl in ("xla", "pallas"):
    cfg.model.attention = impl
    tx = optim.make_optimizer(cfg.optim, 3)
    step = train.make_train_step(cfg, model.graph(cfg.model), tx, optim.lr_schedule(cfg.optim, 3))
    params = model.init_params(cfg.model, 0)
    state = train.init_state(params, tx.init(params), 0)
    losses[impl] = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses[impl].append(float(metrics["loss"]))
  print(losses)
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)

"""The XLA attention against a plain softmax; the Pallas flash-attention kernel and JAX's splash
kernel (both in Pallas interpret mode on the CPU) against the XLA attention; attention targets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanollama_jax import attention as attention_lib
from nanollama_jax.attention import pallas, splash
from nanollama_jax.attention import xla as xla_lib
from nanollama_jax.attention.xla import xla_attention
from nanollama_jax import step as step_lib


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


def plain_softmax(q, k, v, segments, causal):
  """softmax(q k^T / sqrt(E)) v over one explicit T x S mask: no blocks, no custom VJP."""
  T, S = q.shape[1], k.shape[1]
  mask = jnp.ones((1, T, S), bool)
  if causal:
    mask = mask & (jnp.arange(T)[:, None] + S - T >= jnp.arange(S)[None, :])
  if segments is not None:
    mask = mask & (segments[:, :, None] == segments[:, None, :])
  return xla_lib.masked_attention(q, k, v, mask)


jitted_value_and_grads = jax.jit(value_and_grads, static_argnums=(0, 6))


def test_causal_blocks_skip_the_upper_triangle():
  assert xla_lib._blocks(256, 256, True) == [(0, 64, 64), (64, 128, 128), (128, 192, 192),
                                              (192, 256, 256)]
  assert xla_lib._blocks(200, 200, True)[-1] == (192, 200, 200)  # a shorter last block
  assert xla_lib._blocks(256, 256, False) == [(0, 256, 256)]
  assert xla_lib._blocks(64, 64, True) == [(0, 64, 64)]
  blocks = xla_lib._blocks(4096, 4096, True)
  assert len(blocks) == xla_lib.MAX_BLOCKS and blocks[0] == (0, 512, 512)
  # The work done, as a share of T x S: (n + 1) / 2n for n equal blocks.
  assert sum((q1 - q0) * keys for q0, q1, keys in blocks) / 4096**2 == pytest.approx(9 / 16)


# The backward pass either keeps the forward's probabilities or recomputes them.
SAVING, RECOMPUTING = (functools.partial(xla_attention, save_probs=s) for s in (True, False))


def test_short_sequences_keep_their_probabilities():
  assert xla_lib.SAVE_PROBS_MAX_KEYS == 512
  q = jnp.ones((1, 8, 2, 16))

  def residual_shapes(S):
    k = jnp.ones((1, S, 2, 16))
    _, vjp = jax.vjp(lambda q, k: xla_attention(q, k, k, None, False), q, k)
    return [x.shape for x in jax.tree.leaves(vjp)]

  assert (1, 2, 1, 8, 512) in residual_shapes(512)  # B x K x G x T x S probabilities
  assert not [shape for shape in residual_shapes(513) if shape[-2:] == (8, 513)]


@pytest.mark.parametrize("T, S, H, K, causal, segmented, attn", [
  (256, 256, 4, 2, True, True, SAVING),       # 4 blocks of queries
  (256, 256, 4, 2, True, True, RECOMPUTING),
  (200, 200, 4, 4, True, False, RECOMPUTING),  # a last block of 8 queries
  (64, 64, 4, 1, False, True, SAVING),         # one block, no causal mask, one K/V head
  (64, 64, 4, 1, False, True, RECOMPUTING),
  (16, 48, 4, 2, True, False, SAVING),         # queries are the last 16 of 48 keys
])
def test_xla_attention_matches_a_plain_softmax(T, S, H, K, causal, segmented, attn):
  ks = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(ks[0], (2, T, H, 16))
  k, v = (jax.random.normal(key, (2, S, K, 16)) for key in ks[1:3])
  do = jax.random.normal(ks[3], (2, T, H, 16))
  segments = packed_segments(T) if segmented else None
  out, grads = jitted_value_and_grads(attn, q, k, v, do, segments, causal)
  ref, ref_grads = jitted_value_and_grads(plain_softmax, q, k, v, do, segments, causal)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(r))))


@pytest.mark.parametrize("attn", [SAVING, RECOMPUTING])
def test_xla_attention_in_bfloat16_stays_near_float32(attn):
  q, k, v, do = inputs(256, 4, 2, 32, jnp.bfloat16)
  segments = packed_segments(256)
  out, grads = jitted_value_and_grads(attn, q, k, v, do, segments, True)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  ref, ref_grads = jitted_value_and_grads(plain_softmax, *f32, segments, True)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.02
  for g, r in zip(grads, ref_grads):
    assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) < 0.02 * float(jnp.max(jnp.abs(r)))


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
@pytest.mark.slow
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


def max_errors(impl, T, H, K, D, causal, segmented, relative=False):
  """The largest |kernel - reference| of the output and of dq, dk, dv, in float32 (relative: as
  a share of the reference's largest magnitude)."""
  q, k, v, do = inputs(T, H, K, D, jnp.float32)
  seg = packed_segments(T) if segmented else None
  out, grads = value_and_grads(jax.jit(impl, static_argnums=4), q, k, v, do, seg, causal)
  ref, ref_grads = value_and_grads(xla_attention, q, k, v, do, seg, causal)
  return [float(jnp.abs(a - b).max() / (jnp.abs(b).max() if relative else 1.0))
          for a, b in zip((out, *grads), (ref, *ref_grads))]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_kernel_with_unequal_query_and_key_blocks_matches_the_reference(causal):
  """The GPU tables give dq 64 x 32 and dk/dv 32 x 64 blocks; T = 136 is padded to 192."""
  tiles = pallas.Tiles(fwd=pallas.Blocks(64, 32, 4, 1), dq=pallas.Blocks(64, 32, 4, 1),
                       dkv=pallas.Blocks(32, 64, 4, 1))
  impl = functools.partial(pallas.pallas_attention, interpret=True, blocks=tiles)
  errors = max_errors(lambda q, k, v, seg, causal: impl(q, k, v, seg, causal),
                      136, 4, 2, 32, causal, True)
  print(errors)
  assert max(errors) <= 1e-5, errors


def tf32(x):
  """x with its float32 mantissa cut to TF32's 10 bits, as tensor cores read it (truncated)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def test_kernel_with_tf32_dots_stays_within_the_stated_tolerance(monkeypatch):
  """On a GPU the kernel's float32 dots multiply in TF32 (pallas module docstring). With their
  operands cut to TF32 here, the output and gradients differ from float32 by at most 1.9e-3 of
  their largest magnitude (measured); the test allows 4e-3."""
  monkeypatch.setattr(pallas, "_dot", lambda a, b: jnp.dot(
    tf32(a), tf32(b), precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32))
  for case in (CASES[2], CASES[6]):
    errors = max_errors(kernel, *case, relative=True)
    print(case, errors)
    assert max(errors) <= 4e-3, (case, errors)


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


def test_auto_picks_per_target_and_kernels_are_refused_off_their_platform(monkeypatch):
  Platform = attention_lib.Platform
  assert Platform.running() == Platform("cpu")
  picks = {Platform("cuda", "sm_86"): "pallas", Platform("tpu", "v5e"): "splash",
           Platform("cpu"): "xla", Platform("rocm"): "xla"}
  assert {t: attention_lib.resolve("auto", t) for t in picks} == picks
  monkeypatch.delenv(pallas.INTERPRET_ENV, raising=False)
  q, k, v, _ = inputs(64, 2, 1, 32, jnp.float32)
  for impl, kind in [("pallas", "a CUDA GPU kernel"), ("splash", "a TPU kernel"),
                     ("cudnn", "an NVIDIA GPU kernel")]:
    with pytest.raises(ValueError, match=f"model.attention='{impl}' is {kind} and the target is "
                                         "cpu: use model.attention='xla'"):
      attention_lib.attention(q, k, v, impl=impl)  # this host's target: the CPU
  with pytest.raises(ValueError, match="is a CUDA GPU kernel and the target is tpu: use "
                                       "model.attention='xla' \\(or 'auto', which picks 'splash'"):
    attention_lib.resolve("pallas", Platform("tpu", "v6e"))
  with pytest.raises(ValueError, match="is a TPU kernel and the target is cuda"):
    attention_lib.resolve("splash", Platform("cuda", "sm_90"))
  with pytest.raises(ValueError, match="model.attention='flash': allowed: xla, pallas, splash"):
    attention_lib.resolve("flash", Platform("cpu"))
  # Interpret mode is for the Pallas kernels on a CPU only.
  monkeypatch.setenv(pallas.INTERPRET_ENV, "1")
  assert [attention_lib.resolve(i, Platform("cpu")) for i in ("pallas", "splash")] == [
    "pallas", "splash"]
  with pytest.raises(ValueError, match="'cudnn' is an NVIDIA GPU kernel"):
    attention_lib.resolve("cudnn", Platform("cpu"))


@pytest.mark.parametrize("args, message", [
  (("gpu",), "target platform 'gpu': allowed: cpu, cuda, rocm, tpu"),
  (("cuda",), "target generation None for cuda: give the GPU's compute capability as 'sm_XY'"),
  (("cuda", "9.0"), "target generation '9.0' for cuda"),
  (("tpu",), "target generation None for tpu: name one, e.g. 'v4', 'v5e'"),
  (("cpu", "v5e"), "target generation 'v5e' for cpu: must be None"),
])
def test_targets_are_checked(args, message):
  with pytest.raises(ValueError, match=message):
    attention_lib.Platform(*args)


def splash_kernel(q, k, v, segments, causal):
  return splash.splash_attention(q, k, v, segments, causal, interpret=True)


SPLASH_CASES = [
  # T, H, K, D, causal, segments
  (256, 8, 2, 64, True, True),     # 2 x 2 blocks of 128 (one skipped), GQA 8 on 2, documents
  (200, 4, 1, 32, False, True),    # padded to 256 with segment ids that match nothing, MQA
  (130, 4, 4, 128, False, False),  # padded: segment ids made for the padding alone
  (130, 2, 1, 64, True, False),    # padded, causal: no segment ids at all
]


@pytest.mark.parametrize("T, H, K, D, causal, segmented", SPLASH_CASES)
@pytest.mark.slow
def test_splash_matches_the_reference_in_float32(T, H, K, D, causal, segmented):
  q, k, v, do = inputs(T, H, K, D, jnp.float32)
  seg = packed_segments(T) if segmented else None
  out, grads = jitted_value_and_grads(splash_kernel, q, k, v, do, seg, causal)
  ref, ref_grads = jitted_value_and_grads(xla_attention, q, k, v, do, seg, causal)
  errors = [float(jnp.abs(a - b).max()) for a, b in zip((out, *grads), (ref, *ref_grads))]
  print(f"splash T={T} H={H} K={K} D={D} causal={causal} segments={segmented}: max error "
        f"out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} dv {errors[3]:.1e}")
  assert max(errors) <= 1e-5, errors


def test_splash_in_bfloat16_stays_near_float32():
  q, k, v, do = inputs(256, 8, 2, 64, jnp.bfloat16)
  seg = packed_segments(256)
  out, grads = jitted_value_and_grads(splash_kernel, q, k, v, do, seg, True)
  ref, ref_grads = jitted_value_and_grads(
    xla_attention, *(x.astype(jnp.float32) for x in (q, k, v, do)), seg, True)
  for a, b in zip((out, *grads), (ref, *ref_grads)):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 2e-2 * max(scale, 1.0)


def test_splash_blocks_per_generation_and_length():
  def blocks(length, generation):
    b = splash.choose_blocks(length, generation)
    return (b.block_q, b.block_kv, b.block_kv_compute, b.block_q_dkv, b.block_kv_dkv,
            b.block_kv_dkv_compute, b.block_q_dq, b.block_kv_dq)

  for generation in ("v4", "v5e", "v5p", "7x"):
    assert blocks(2048, generation) == (512,) * 8
  # v6e: the query blocks of the forward and dq kernels twice as long.
  assert blocks(2048, "v6e") == (1024, 512, 512, 512, 512, 512, 1024, 512)
  assert blocks(1536, "v6e") == (512,) * 8  # 1024 does not divide 1536
  assert blocks(128, "v6e") == (128,) * 8  # never longer than the sequence
  assert blocks(640, "v5e") == (128,) * 8  # 5 x 128
  assert blocks(8192, None) == (128,) * 8  # interpret mode


@pytest.mark.slow
def test_three_training_steps_with_the_kernel_match_xla(sample_dir, tokenizer_path, monkeypatch):
  from nanollama_jax import config, model, optim
  from nanollama_jax.data import pipeline
  from nanollama_jax.data.tokenizer_source import load as load_tokenizer
  monkeypatch.setenv(pallas.INTERPRET_ENV, "1")
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=128, max_seq_len=64))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"), tokenizer=str(tokenizer_path),
                       seq_len=64, batch_size=4))
  cfg.optim.update(dict(lr=3e-3, warmup_steps=1))
  batches = pipeline.train_batches(cfg.data, load_tokenizer(str(tokenizer_path)))
  batches = [next(batches) for _ in range(3)]
  losses = {}
  for impl in ("xla", "pallas", "splash"):
    cfg.model.attention = impl
    tx = optim.make_optimizer(cfg.optim, 3)
    step = step_lib.make_train_step(cfg, model.graph(cfg.model), tx, optim.lr_schedule(cfg.optim, 3))
    params = model.init_params(cfg.model, 0)
    state = step_lib.init_state(params, tx.init(params), 0)
    losses[impl] = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses[impl].append(float(metrics["loss"]))
  print(losses)
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
  np.testing.assert_allclose(losses["splash"], losses["xla"], rtol=1e-5)

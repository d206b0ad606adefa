"""The model's numbers: shapes, masking, GQA, RoPE, scan/remat equivalence, parameter counts."""

import functools
import json
import math
import re
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanollama_jax import config, model
from nanollama_jax import loss as loss_lib
from nanollama_jax.attention import attention


def tiny_cfg(**overrides):
  cfg = config.get_default_config().model
  cfg.update(dict(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96))
  cfg.update(overrides)
  return cfg


# XLA's CPU compiler dominates this file's time: build and compile each config once.
@functools.cache
def _init(cfg_json, seed):
  return model.init_params(config.ml_collections.ConfigDict(json.loads(cfg_json)), seed)


def init(cfg, seed):
  return _init(json.dumps(cfg.to_dict(), sort_keys=True), seed)


@functools.cache
def _forward(cfg_json):
  graphdef = model.graph(config.ml_collections.ConfigDict(json.loads(cfg_json)))
  return jax.jit(functools.partial(model.apply, graphdef))


def logits(cfg, params, tokens, segment_ids=None, positions=None):
  return _forward(json.dumps(cfg.to_dict(), sort_keys=True))(params, tokens, segment_ids,
                                                             positions)


def random_tokens(seed, shape, vocab=97):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_shapes_and_dtypes():
  cfg = tiny_cfg(dtype="bfloat16")
  params = init(cfg, 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert params["embed_VxD"].shape == (97, 64)
  assert params["layers"]["attn"]["wk_DxKxE"].shape == (3, 64, 2, 16)
  assert params["layers"]["mlp"]["w_down_FxD"].shape == (3, 96, 64)
  out = logits(cfg, params, random_tokens(0, (2, 10)))
  assert out.shape == (2, 10, 97) and out.dtype == jnp.float32


def test_init_scales():
  cfg = tiny_cfg(dim=256, n_heads=4, n_kv_heads=4, ffn_dim=512, n_layers=8)
  params = init(cfg, 0)
  np.testing.assert_allclose(np.std(params["layers"]["attn"]["wq_DxHxE"]), 0.02, rtol=0.02)
  np.testing.assert_allclose(np.std(params["layers"]["mlp"]["w_up_DxF"]), 0.02, rtol=0.02)
  residual_std = 0.02 / math.sqrt(2 * 8)
  np.testing.assert_allclose(np.std(params["layers"]["attn"]["wo_HxExD"]), residual_std, rtol=0.02)
  np.testing.assert_allclose(np.std(params["layers"]["mlp"]["w_down_FxD"]), residual_std,
                             rtol=0.02)
  assert np.all(params["final_norm"]["scale"] == 1.0)


def test_causality():
  cfg = tiny_cfg()
  params = init(cfg, 0)
  tokens = random_tokens(0, (1, 12))
  changed = tokens.at[:, 7:].set(random_tokens(1, (1, 5)))
  a, b = logits(cfg, params, tokens), logits(cfg, params, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-3


@pytest.mark.parametrize("qk_norm", [False, True])
def test_packed_documents_do_not_see_each_other(qk_norm):
  cfg = tiny_cfg(qk_norm=qk_norm)
  params = init(cfg, 0)
  doc_a, doc_b = random_tokens(2, (1, 5)), random_tokens(3, (1, 7))
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  out = logits(cfg, params, packed, segment_ids, positions)
  np.testing.assert_allclose(out[:, :5], logits(cfg, params, doc_a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], logits(cfg, params, doc_b), atol=1e-5)


def test_gqa_equals_multihead_with_tiled_kv():
  gqa_cfg = tiny_cfg(n_heads=8, n_kv_heads=2)
  mha_cfg = tiny_cfg(n_heads=8, n_kv_heads=8)
  params = init(gqa_cfg, 0)
  tiled = jax.tree.map(lambda x: x, params)
  for name in ("wk_DxKxE", "wv_DxKxE"):  # query head h reads K/V head h // 4
    tiled["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 4, axis=2)
  tokens = random_tokens(4, (2, 9))
  np.testing.assert_allclose(logits(gqa_cfg, params, tokens), logits(mha_cfg, tiled, tokens),
                             atol=1e-5)


def test_gqa_attention_reads_kv_head_by_group():
  """Query head h must use K/V head h // G, not h % K: a wrong index changes the output."""
  B, T, H, K, E = 1, 6, 4, 2, 8
  q = jax.random.normal(jax.random.key(0), (B, T, H, E))
  k = jax.random.normal(jax.random.key(1), (B, T, K, E))
  v = jax.random.normal(jax.random.key(2), (B, T, K, E))
  out = attention(q, k, v)
  for h in range(H):
    kv = h // (H // K)
    scores = jnp.einsum("te,se->ts", q[0, :, h], k[0, :, kv]) / math.sqrt(E)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    expected = jax.nn.softmax(scores, axis=-1) @ v[0, :, kv]
    np.testing.assert_allclose(out[0, :, h], expected, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  E = 16
  inv_freq = model.rope_frequencies(E, 10000.0)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, E))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, E))

  def score(m, n):
    def rotate(x, pos):
      angles = jnp.full((1, 1), float(pos))[..., None] * inv_freq
      return model.apply_rope(x, jnp.sin(angles), jnp.cos(angles))
    return float(jnp.sum(rotate(q, m) * rotate(k, n)))

  base = score(3, 1)
  for shift in (1, 10, 1000):
    np.testing.assert_allclose(score(3 + shift, 1 + shift), base, rtol=1e-4)
  assert abs(score(5, 1) - base) > 1e-3  # a different distance gives a different score


def test_llama31_scaled_frequencies_match_the_published_formula():
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  E, theta = 128, 500000.0
  got = np.asarray(model.rope_frequencies(E, theta, scaling))
  # The reference formula of Llama 3.1 (apply_scaling), written out scalar by scalar.
  low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
  high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
  expected = []
  for i in range(0, E, 2):
    freq = 1.0 / theta ** (i / E)
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      expected.append(freq)
    elif wavelen > low_wavelen:
      expected.append(freq / scaling["factor"])
    else:
      smooth = (scaling["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * freq / scaling["factor"] + smooth * freq)
  np.testing.assert_allclose(got, np.array(expected), rtol=1e-5)
  unscaled = np.asarray(model.rope_frequencies(E, theta))
  assert got[0] == pytest.approx(unscaled[0])  # highest frequency kept
  assert got[-1] == pytest.approx(unscaled[-1] / 8.0)  # lowest divided by the factor
  assert np.sum(got != unscaled) > 0 and np.sum(np.isclose(got, unscaled)) > 0


@functools.cache
def loss_and_grads(variant):
  cfg = tiny_cfg(qk_norm=True, **dict(variant))
  params = init(tiny_cfg(qk_norm=True), 0)
  tokens = random_tokens(5, (2, 8))
  graphdef = model.graph(cfg)

  def loss(p):
    out = model.apply(graphdef, p, tokens)
    return loss_lib.cross_entropy(out[:, :-1], tokens[:, 1:], jnp.ones((2, 7)))[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("variant", [
  {"scan_layers": False}, {"remat": "full"}, {"remat": "save_dots"}, {"remat": "save_attn"},
  {"remat": "save_dots_attn"},
  {"scan_layers": False, "remat": "full"},
])
@pytest.mark.slow
def test_scan_and_remat_give_the_same_numbers(variant):
  l0, g0 = loss_and_grads(())
  l1, g1 = loss_and_grads(tuple(sorted(variant.items())))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def remat_temp_bytes(remat: str) -> int:
  """XLA's temporary-memory estimate for loss + gradients of a 4-layer model, 4 x 512 tokens."""
  cfg = tiny_cfg(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                 max_seq_len=512, remat=remat)
  graphdef = model.graph(cfg)
  params = model.abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)

  def loss(p, t):
    return loss_lib.cross_entropy(model.apply(graphdef, p, t), t, jnp.ones(t.shape))[0]

  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_policies_trade_memory_as_named():
  temp = {r: remat_temp_bytes(r) for r in ("none", "save_dots_attn", "save_attn", "full")}
  # Measured here: none 219 MB, save_dots_attn 117 MB, save_attn 74 MB, full 93 MB (full
  # recomputes attention inside the backward pass, whose scores then live at the same time as
  # the layer's gradients; keeping the attention output avoids that). "none" keeps no attention
  # probabilities either: the XLA attention recomputes them in its backward pass.
  assert temp["save_attn"] < temp["save_dots_attn"] < temp["none"], temp
  assert max(temp["full"], temp["save_attn"]) < 0.5 * temp["none"], temp


def test_tied_embeddings_share_the_output_projection():
  cfg = tiny_cfg(tie_embeddings=True)
  params = init(cfg, 0)
  assert "lm_head_DxV" not in params
  assert model.param_count(params) == model.param_count_formula(cfg)
  tokens = random_tokens(6, (1, 4))
  grads = jax.jit(jax.grad(lambda p: logits(cfg, p, tokens)[0, -1, 3]))(params)
  assert float(jnp.abs(grads["embed_VxD"][3]).sum()) > 0  # row 3 gets gradient as output


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"tie_embeddings": True},
                                       {"n_kv_heads": 1}])
def test_param_count_formula(overrides):
  cfg = tiny_cfg(**overrides)
  assert model.param_count(init(cfg, 0)) == model.param_count_formula(cfg)


def test_tinystories_param_count():
  cfg = runpy.run_path("configs/tinystories.py")["get_config"]().model
  abstract = model.abstract_params(cfg)
  # V*D*2 (embedding + untied head) + 4 layers * (attention 2*D*D + 2*D*K*E, SwiGLU 3*D*F,
  # two norms 2*D) + final norm D, with V=10000, D=1024, K*E=256, F=1536.
  expected = 10000 * 1024 * 2 + 4 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 1536
                                      + 2 * 1024) + 1024
  assert expected == 49_849_344
  assert model.param_count(abstract) == expected == model.param_count_formula(cfg)
  assert expected - model.embedding_param_count(cfg) == 29_369_344


def test_logical_axes_name_every_dimension():
  cfg = tiny_cfg(qk_norm=True)
  axes = model.logical_axes(cfg)
  params = init(cfg, 0)
  flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_axes) == len(jax.tree.leaves(params))
  for spec, x in zip(flat_axes, jax.tree.leaves(params)):
    assert len(spec) == x.ndim and all(isinstance(name, str) for name in spec)
  assert tuple(axes["layers"]["attn"]["wq_DxHxE"]) == ("layers", "embed", "heads", "head_dim")


def test_rope_sin_and_cos_are_computed_once_per_position():
  """The compiled gradient computes sin and cos only on the position table, never per head."""
  cfg = tiny_cfg(max_seq_len=64, scan_layers=False)
  params, graphdef = init(cfg, 0), model.graph(cfg)
  tokens = random_tokens(3, (2, 16))
  positions = jnp.broadcast_to(jnp.arange(16) % 5, (2, 16))  # packed documents restart at 0

  def loss(params):
    return jnp.sum(model.apply(graphdef, params, tokens, None, positions))

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  shapes = re.findall(r"= f32\[([\d,]*)\][^=]*? (?:sine|cosine)\(", hlo)
  assert sorted(shapes) == ["64,8", "64,8"]  # one sin and one cos of [max_seq_len, E/2]


def test_positions_past_the_rope_table_give_nan_not_a_wrong_rotation():
  cfg = tiny_cfg(max_seq_len=32)
  params = init(cfg, 0)
  tokens = random_tokens(4, (1, 4))
  inside = logits(cfg, params, tokens, positions=jnp.array([[0, 1, 30, 31]]))
  past = logits(cfg, params, tokens, positions=jnp.array([[0, 1, 2, 32]]))
  assert bool(jnp.all(jnp.isfinite(inside)))
  assert bool(jnp.all(jnp.isnan(past)))  # the NaN key reaches every query's max


def test_rope_scaling_reaches_the_model():
  """The config's Llama 3.1 scaling changes attention exactly as the frequencies say."""
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 16}
  plain, scaled = tiny_cfg(), tiny_cfg(rope_scaling=scaling)
  params = init(plain, 0)
  tokens = random_tokens(7, (1, 40))
  diff = jnp.abs(logits(plain, params, tokens) - logits(scaled, params, tokens))
  assert float(diff[0, 0].max()) < 1e-6  # position 0 is not rotated by any frequency
  assert float(diff[0, 1:].max()) > 1e-4


def _loss_and_grads(cfg, params, batch):
  graphdef = model.graph(cfg)

  def mean_loss(p):
    total, count = loss_lib.loss_sums(graphdef, p, batch)
    return total / count
  return jax.jit(jax.value_and_grad(mean_loss))(params)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.slow
def test_chunked_loss_equals_the_plain_one(tied):
  cfg = tiny_cfg(vocab_size=300, max_seq_len=64, tie_embeddings=tied)
  params = model.init_params(cfg, 0)
  rng = np.random.default_rng(0)
  B, T = 3, 50
  batch = {"inputs": rng.integers(0, 300, (B, T)).astype(np.int32),
           "targets": rng.integers(0, 300, (B, T)).astype(np.int32),
           "segment_ids": np.repeat([[1] * 20 + [2] * 30], B, 0).astype(np.int32),
           "positions": np.tile(np.r_[np.arange(20), np.arange(30)], (B, 1)).astype(np.int32),
           "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}
  plain_loss, plain_grads = _loss_and_grads(
    tiny_cfg(**{**cfg.to_dict(), "chunked_loss": "off"}), params, batch)
  for chunk_len in (7, 16, 50, 64):  # 64 > T: one chunk; 7 and 16 leave a padded last chunk
    cfg.update(dict(chunked_loss="on", loss_chunk_len=chunk_len))
    loss, grads = _loss_and_grads(cfg, params, batch)
    assert abs(float(loss) - float(plain_loss)) < 1e-6 * float(plain_loss), chunk_len
    worst = max(float(jnp.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)))
    assert worst < 1e-6, (chunk_len, worst)


@pytest.mark.slow
def test_chunked_loss_never_holds_the_whole_logits():
  """XLA's own buffer accounting: the step's temporaries shrink by more than the float32
  logits, and `auto` turns the chunks on for large vocabularies only."""
  B, T, V = 4, 256, 8192
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct((B, T), jnp.float32)
  temps = {}
  for mode in ("off", "on"):
    cfg = tiny_cfg(vocab_size=V, max_seq_len=T, chunked_loss=mode, loss_chunk_len=32)
    graph = model.graph(cfg)
    step = jax.jit(jax.grad(lambda p, b, g=graph: loss_lib.loss_sums(g, p, b)[0]))
    compiled = step.lower(model.abstract_params(cfg), batch).compile()
    temps[mode] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = B * T * V * 4
  assert temps["on"] < temps["off"] - logits_bytes, (temps, logits_bytes)
  assert not loss_lib.chunked_loss(tiny_cfg(vocab_size=10000))  # auto: TinyStories stays plain
  assert loss_lib.chunked_loss(tiny_cfg(vocab_size=32000))

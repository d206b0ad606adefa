"""Meshes and logical-axis rules: sharded steps equal one device, multi-process equals one process."""

import collections
import json
import os
import re
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import REPO, cpu_env, free_port
from nanollama_jax import checkpoint, config, errors, generate, model, optim, sharding
from nanollama_jax.attention import Platform
from nanollama_jax.attention.xla import xla_attention
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer_source import load as load_tokenizer
from nanollama_jax import step as step_lib


def mesh_cfg(data=1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_sizes_resolve_and_mismatches_are_named():
  assert sharding.mesh_shape(mesh_cfg(2, -1, 2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape(mesh_cfg(1, -1, 1), 8)["fsdp"] == 8
  with pytest.raises(errors.ConfigError, match=r"data=2 x fsdp=2 x tensor=1 = 4 devices, but "
                                               r"there are 8"):
    sharding.mesh_shape(mesh_cfg(2, 2, 1), 8)
  with pytest.raises(errors.ConfigError, match="do not divide the 8 devices"):
    sharding.mesh_shape(mesh_cfg(3, -1, 1), 8)
  cfg = config.get_default_config()
  cfg.mesh.update(dict(data=-1, fsdp=-1))
  with pytest.raises(errors.ConfigError, match="at most one axis can be -1"):
    config.validate(cfg, check_files=False)


def test_rules_map_logical_axes_and_leave_indivisible_dimensions_whole():
  mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
  spec = sharding.logical_to_spec
  assert spec(("layers", "embed", "heads", "head_dim"), (4, 64, 8, 16), mesh) == P(
    None, "fsdp", "tensor", None)
  assert spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
  assert spec(("batch", "length"), (8, 32), mesh) == P(("data", "fsdp"), None)
  assert spec(("batch", "length", "embed"), (8, 32, 64), mesh) == P(("data", "fsdp"), None, None)
  assert spec(("embed", "kv_heads"), (64, 1), mesh) == P("fsdp", None)  # 1 head: replicated
  assert spec(("batch",), (6,), mesh) == P("data")  # 6 rows split 2 ways, not 4


@pytest.mark.parametrize("K, heads_split", [(2, True), (1, False)])
@pytest.mark.slow
def test_a_kernel_runs_on_each_devices_rows_and_heads(K, heads_split):
  """per_shard hands each device its rows and heads; K/V heads are split with the query heads,
  or neither is (1 K/V head cannot be split 2 ways), and the result is the unsharded one."""
  mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
  ks = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(key, (8, 16, 4, 8)) for key in ks[:2])
  k, v = (jax.random.normal(key, (8, 16, K, 8)) for key in ks[2:])
  seg = jnp.asarray(np.arange(8)[:, None] % 3 + (np.arange(16)[None] >= 9))  # two documents
  shapes = []

  def kernel(q, k, v, seg):
    shapes.append((q.shape, k.shape, seg.shape))
    return xla_attention(q, k, v, seg, True)

  heads = ("batch", "length", "heads", "head_dim")
  sharded = sharding.per_shard(kernel, (heads,) * 3 + (("batch", "length"),), heads)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, seg) * do)

  on_mesh = jax.device_put((q, k, v), sharding.replicated(mesh))
  got = jax.jit(sharding.under_mesh(jax.value_and_grad(
    lambda *a: loss(sharded, *a), argnums=(0, 1, 2)), mesh))(*on_mesh)
  want = jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(q, k, v)
  H_local, K_local = (2, K // 2) if heads_split else (4, K)
  assert shapes[0] == ((2, 16, H_local, 8), (2, 16, K_local, 8), (2, 16))  # 8 rows / (2 x 2)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def small_model_cfg(sample_dir, tokenizer_path):
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=4,
                        ffn_dim=128, max_seq_len=32, qk_norm=True))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"), eval_files="",
                       tokenizer=str(tokenizer_path), seq_len=32, batch_size=8))
  # Adam's first update is g / (|g| + eps): with the usual eps = 1e-8 it turns float32
  # summation-order noise in near-zero gradients into visible differences (we saw 2 of 16,384
  # elements differ by 2.5e-4 across meshes), so the comparison uses a larger eps.
  cfg.optim.update(dict(lr=1e-2, warmup_steps=1, eps=1e-4))
  cfg.train.steps = 10
  return cfg


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)],
                         ids=["data8", "fsdp8", "d2f2t2", "d2t4"])
@pytest.mark.slow
def test_a_sharded_step_equals_the_single_device_step(sample_dir, tokenizer_path, shape):
  cfg = small_model_cfg(sample_dir, tokenizer_path)
  cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), shape)))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  graphdef = model.graph(cfg.model)
  batch = next(pipeline.train_batches(cfg.data, load_tokenizer(str(tokenizer_path))))

  params = model.init_params(cfg.model, 0)
  one = step_lib.make_train_step(cfg, graphdef, tx, schedule)
  want, want_metrics = one(step_lib.init_state(params, tx.init(params), 0), batch)

  mesh = sharding.make_mesh(cfg.mesh)
  _, shardings = step_lib.state_sharding(cfg, tx, mesh)
  state = jax.jit(lambda: step_lib.init_state(p := model.init_params(cfg.model, 0), tx.init(p), 0),
                  out_shardings=shardings)()
  step = step_lib.make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
  got, got_metrics = step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)))

  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
  assert float(got_metrics["grad_norm"]) == pytest.approx(float(want_metrics["grad_norm"]),
                                                          rel=1e-5)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  # The parameters and Adam's moments are laid out as the rules say.
  data, fsdp, tensor = shape
  wq = got.params["layers"]["attn"]["wq_DxHxE"]
  expect = P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None)
  assert wq.sharding.spec == expect
  assert wq.addressable_shards[0].data.shape == (2, 64 // fsdp, 8 // tensor, 8)
  mu = got.opt_state[1][0].mu["layers"]["attn"]["wq_DxHxE"]
  assert mu.sharding.spec == expect
  embed = got.params["embed_VxD"]
  assert embed.sharding.spec == P("tensor" if tensor > 1 else None, "fsdp" if fsdp > 1 else None)


@pytest.mark.slow
def test_gradient_accumulation_on_a_mesh_matches_one_big_batch(sample_dir, tokenizer_path):
  cfg = small_model_cfg(sample_dir, tokenizer_path)
  cfg.data.batch_size = 16
  cfg.mesh.update(dict(data=2, fsdp=4))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  graphdef = model.graph(cfg.model)
  batch = next(pipeline.train_batches(cfg.data, load_tokenizer(str(tokenizer_path))))
  batch["loss_mask"][5, 7:] = 0.0  # uneven token counts across micro-batches
  mesh = sharding.make_mesh(cfg.mesh)
  _, shardings = step_lib.state_sharding(cfg, tx, mesh)
  results = []
  for accum in (1, 2):
    cfg.optim.grad_accum = accum
    state = jax.jit(lambda: step_lib.init_state(p := model.init_params(cfg.model, 0), tx.init(p),
                                             0), out_shardings=shardings)()
    step = step_lib.make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    results.append(step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh))))
  (s1, m1), (s2, m2) = results
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _cli(workdir, sample_dir, tokenizer_path, extra=()):
  return [sys.executable, "-m", "nanollama_jax.train",
          "--config", os.path.join(REPO, "configs", "tinystories_cpu.py"),
          "--workdir", str(workdir), "--config.data.source=files",
          f"--config.data.train_files={sample_dir / 'train.jsonl'}",
          f"--config.data.eval_files={sample_dir / 'validation.jsonl'}",
          f"--config.data.tokenizer={tokenizer_path}", "--config.model.vocab_size=512",
          "--config.model.dim=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
          "--config.model.n_kv_heads=2", "--config.model.ffn_dim=128",
          "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.train.steps=6",
          "--config.train.log_every=1", "--config.train.eval_every=6",
          "--config.train.eval_steps=2", "--config.train.ckpt_every=3",
          "--config.optim.warmup_steps=2", "--config.mesh.fsdp=2", "--config.mesh.data=-1",
          *extra]


@pytest.mark.slow
def test_two_processes_train_like_one(sample_dir, tokenizer_path, tmp_path):
  """Two processes with 2 CPU devices each (gloo collectives), each reading its own share of
  the data, train like one device fed both shares as one global batch."""
  port = free_port()
  procs = [subprocess.Popen(
    _cli(tmp_path, sample_dir, tokenizer_path,
         [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]),
    cwd=REPO, env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1 of 2: 2 local devices, 4 in all" in outputs[1][1]
  for i in range(2):
    assert f"data: this process reads share {i} of 2" in outputs[i][1]
  assert "step 6/6" in outputs[0][1] and "step 6/6" not in outputs[1][1]  # only process 0 logs
  # Both processes ran the sampler together (the recipe samples at each evaluation), its rows
  # and KV cache split over the 4 devices of both; one process on one device samples the same
  # continuations from the step's checkpoint.
  cfg_saved, params, _ = checkpoint.load_run(str(tmp_path), 6)
  alone = generate.Samples(cfg_saved, load_tokenizer(str(tokenizer_path))).continue_prompts(params)
  assert [t.split(" ", 1)[0] for t in alone] == ["Once", "One"]
  for text in alone:
    assert f"step 6 sample: {text!r}" in outputs[0][1]
  assert "sample:" not in outputs[1][1]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]

  # The same steps on one device, each global batch the two processes' local batches.
  cfg = config.from_json((tmp_path / "config.json").read_text())
  tok = load_tokenizer(str(tokenizer_path))
  shares = [pipeline.train_batches(cfg.data, tok, i, 2) for i in range(2)]
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  step = step_lib.make_train_step(cfg, model.graph(cfg.model), tx,
                               optim.lr_schedule(cfg.optim, cfg.train.steps))
  params = model.init_params(cfg.model, cfg.train.seed)
  state = step_lib.init_state(params, tx.init(params), cfg.train.seed)
  for row in rows[:6]:
    local = [next(it) for it in shares]
    state, got = step(state, {k: np.concatenate([b[k] for b in local]) for k in local[0]})
    for key in ("loss", "grad_norm"):
      assert row[key] == pytest.approx(float(got[key]), rel=1e-5), (key, row["step"])
  assert rows[-1]["eval_loss"] > 0
  # Each process wrote the position of its data stream into the shared checkpoint.
  data_files = sorted(os.listdir(tmp_path / "checkpoints" / "6" / "data"))
  assert [f for f in data_files if f.endswith(".json")] == [
    "stream_0-of-2.json", "stream_1-of-2.json"]


@pytest.mark.parametrize("name, count", [("llama3_2_1b", 1_235_814_400),
                                         ("tinyllama_1b", 1_100_048_384),
                                         ("dense_180m", 226_546_432),
                                         ("llama3_1_8b", 8_030_261_248)])
def test_published_shapes_have_their_parameter_counts(name, count):
  cfg = runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()
  config.validate(cfg, check_files=False)
  abstract = model.abstract_params(cfg.model)
  assert model.param_count(abstract) == model.param_count_formula(cfg.model) == count


def test_the_tinyllama_recipe_has_the_tinyllama_setup_as_a_sizing():
  get_config = runpy.run_path(os.path.join(REPO, "configs", "tinyllama_1b.py"))["get_config"]
  one, sixteen = get_config(), get_config("a100x16")
  assert (one.data.batch_size, one.optim.grad_accum) == (64, 8)
  assert (sixteen.data.batch_size, sixteen.optim.grad_accum) == (1024, 1)
  assert one.model == sixteen.model
  with pytest.raises(ValueError, match="the sizings are h100, a100x16"):
    get_config("v5p")


def test_the_8b_recipe_has_a_sizing_per_hardware():
  """configs/llama3_1_8b.py:h100x8 keeps the global batch and accumulates 2 micro-batches; an
  unknown sizing is refused by name."""
  get_config = runpy.run_path(os.path.join(REPO, "configs", "llama3_1_8b.py"))["get_config"]
  pod, node = get_config(), get_config("h100x8")
  assert (pod.optim.grad_accum, node.optim.grad_accum) == (1, 2)
  assert pod.data.batch_size == node.data.batch_size == 128
  assert pod.model == node.model
  with pytest.raises(ValueError, match="the sizings are v5p_128, h100x8"):
    get_config("a100")


@pytest.mark.parametrize("name", ["llama3_2_1b", "tinyllama_1b", "dense_180m"])
@pytest.mark.slow
def test_published_recipes_compile_sharded_over_8_devices(name):
  """Each recipe's train step lowers and compiles for an 8-way FSDP mesh from abstract inputs."""
  cfg = runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()
  mesh = sharding.make_mesh(cfg.mesh)  # fsdp=-1: all 8 devices
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  memory = step_lib.lower_train_step(cfg, mesh).compile().memory_analysis()
  n = model.param_count_formula(cfg.model)
  abstract, shardings = step_lib.state_sharding(
    cfg, optim.make_optimizer(cfg.optim, cfg.train.steps), mesh)
  held = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
  # float32 parameters, Adam's mu and nu, split 8 ways; only small vectors without an `embed`
  # dimension (QK-norm scales, counters, the RNG key) are replicated.
  assert n * 4 * 3 / 8 <= held <= n * 4 * 3 / 8 * 1.001
  batch_per_device = 5 * cfg.data.batch_size * cfg.data.seq_len * 4 / 8
  assert memory.argument_size_in_bytes == pytest.approx(held + batch_per_device, abs=64)
  assert memory.alias_size_in_bytes >= n * 4 * 3 / 8  # the step updates the state in place
  print(f"{name}: {n:,} parameters; per device: arguments "
        f"{memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
        f"{memory.temp_size_in_bytes / 2**30:.2f} GiB")


# Kernel custom calls in a lowered train step: forward, dq and dk/dv, plus the forward again where
# remat recomputes each layer in the backward pass. The scanned layers appear once.
@pytest.mark.parametrize("name, gpu, calls", [("tinystories", "sm_86", 3),
                                              ("dense_180m", "sm_90", 4),
                                              ("tinyllama_1b", "sm_90", 4),
                                              ("llama3_2_1b", "sm_90", 4)])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_recipes_lower_with_their_attention_kernels(name, gpu, calls, platform):
  """With `auto`, each accelerator recipe's train step lowers for a GPU with our Pallas (Triton)
  kernel and for a TPU with splash, on an 8-way FSDP mesh at the recipe's shapes (no array is
  allocated, nothing is compiled): every device runs the kernels on its own rows."""
  cfg = runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()
  assert cfg.model.attention == "auto"
  target, custom_call = {"cuda": (Platform("cuda", gpu), "__gpu$xla.gpu.triton"),
                         "tpu": (Platform("tpu", "v5e"), "tpu_custom_call")}[platform]
  try:
    text = step_lib.lower_train_step(cfg, sharding.make_mesh(cfg.mesh), target).as_text()
  except RuntimeError as e:
    if "Triton compilation handler" not in str(e):
      raise
    pytest.skip(f"this jaxlib lowers Triton kernels only with the CUDA plugin installed: {e}")
  kernels = re.findall(r"stablehlo\.custom_call @([\w$.]+)\(.*\) .*: \((.*)\) ->", text)
  assert collections.Counter(name for name, _ in kernels) == {custom_call: calls}
  # The largest operand is q (or dout): a micro-batch's rows on one device, all their heads.
  rows = cfg.data.batch_size // cfg.optim.grad_accum // 8
  for _, operands in kernels:
    sizes = [np.prod([int(n) for n in dims.split("x")])
             for dims in re.findall(r"tensor<([\dx]+)xbf16>", operands)]
    assert max(sizes) == rows * cfg.data.seq_len * cfg.model.dim

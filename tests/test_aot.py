"""Deviceless compiles for named GPUs and TPUs (aot.py, scripts/aot_compile.py).

They need the aot extra (the CUDA plugin with nvcc, and libtpu) and skip without it; CI runs
them in the virtual environment of that extra. Models are small so that each compile takes
seconds; the recipes at full size are compiled by scripts/aot_compile.py in CI.
"""

import dataclasses
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from helpers import REPO, run_script
from nanollama_jax import aot, recipe, roofline, targets
from nanollama_jax import config as config_lib

_CUDA = importlib.util.find_spec("jax_cuda12_plugin") is not None
_TPU = importlib.util.find_spec("libtpu") is not None
needs_cuda = pytest.mark.skipif(not _CUDA, reason='needs the aot extra: pip install -e ".[aot]"')
needs_tpu = pytest.mark.skipif(not _TPU, reason='needs the aot extra: pip install -e ".[aot]"')


def small_cfg(**data):
  """A 2-layer model of the TinyStories recipe's kind (bf16, attention auto)."""
  cfg = config_lib.get_default_config()
  cfg.model.update(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                   max_seq_len=128, dtype="bfloat16", attention="auto")
  cfg.data.update({"seq_len": 128, "batch_size": 8, **data})
  return cfg


@needs_cuda
@pytest.mark.parametrize("name", list(targets.GPUS))
def test_xla_accepts_every_gpu_of_the_table(name):
  """Each generated target config describes its GPU to XLA: the kind the driver would report."""
  target = targets.parse(name)
  (device,) = aot.devices(target)
  assert device.device_kind == target.gpu.kind
  assert device.platform == "gpu"


@needs_cuda
def test_a_gpu_train_step_compiles_with_our_kernels_and_fits():
  report = aot.compile_target(small_cfg(), targets.parse("rtx3090"))
  assert report.attention == "pallas" and report.error is None
  by_name = {p.program: p for p in report.programs}
  assert list(by_name) == list(aot.PROGRAMS)
  assert all(p.ok and p.fits for p in report.programs), aot.format_report(report)
  # forward, dq and dk/dv through XLA's Triton; evaluation runs the forward only.
  assert (by_name["train_step"].kernels, by_name["eval_step"].kernels) == (3, 1)
  # The prefill attends through our kernel, the decode step (one query a row) on the XLA path.
  assert (by_name["prefill"].kernels, by_name["decode"].kernels) == (1, 0)
  train = by_name["train_step"]
  assert train.total_bytes == train.argument_bytes + train.temp_bytes + train.output_bytes
  # Parameters in float32, Adam's two moments: the state is 3 x 4 bytes per parameter.
  params = 512 * 128 * 2 + 2 * (4 * 128 * 32 * 2 + 2 * 128 * 32 * 2 + 3 * 128 * 256 + 2 * 128)
  params += 128
  assert 12 * params <= train.argument_bytes <= 12 * params + 8 * 128 * 5 * 4 + 1024
  # Evaluation and sampling run with the optimizer state resident beside them.
  assert by_name["eval_step"].resident_bytes == pytest.approx(8 * params, abs=64)
  assert report.fits and report.bytes_per_device == max(p.total_bytes for p in report.programs)


@needs_cuda
def test_sharded_over_8_gpus_each_device_holds_an_eighth():
  one = aot.compile_target(small_cfg(batch_size=64), targets.parse("h100_sxm"), ("train_step",))
  eight = aot.compile_target(small_cfg(batch_size=64), targets.parse("h100_sxm:8"),
                             ("train_step",))
  assert eight.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and eight.batch_per_device == 8
  assert eight.programs[0].argument_bytes < one.programs[0].argument_bytes / 7


@needs_cuda
def test_sampling_over_8_gpus_splits_the_rows_and_their_kv_cache():
  """8 rows (the sample prompts padded to the 8 devices) of a prefill and a decode step: the
  parameters, the tokens and the KV cache are split, nothing is replicated."""
  cfg = small_cfg(batch_size=64)
  cfg.train.sample_prompts = "|".join(["Once upon a time"] * 8)
  one = aot.compile_target(cfg, targets.parse("h100_sxm"), ("prefill", "decode"))
  eight = aot.compile_target(cfg, targets.parse("h100_sxm:8"), ("prefill", "decode"))
  for alone, split in zip(one.programs, eight.programs):
    assert split.ok and alone.ok, (split.error, alone.error)
    assert split.argument_bytes < alone.argument_bytes / 7, split.program
    # All in, less than a third: the temporaries hold each layer's gathered weights, the same
    # on every device, and weigh more than the rest in a model this small.
    assert split.total_bytes < alone.total_bytes / 3, split.program


@needs_cuda
def test_a_batch_that_does_not_split_over_the_devices_is_reported_not_raised():
  report = aot.compile_target(small_cfg(batch_size=12), targets.parse("a100_80gb:2x8"))
  assert not report.fits and report.programs == []
  assert "must be divisible by mesh data x fsdp = 16" in report.error


@needs_cuda
def test_max_batch_is_the_largest_micro_batch_that_fits(monkeypatch):
  """With 0.1% of an RTX 3090 (24 MB) to use, the bisection stops where one more sequence per
  device no longer fits."""
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.001")
  target = targets.parse("rtx3090")
  best, report = aot.max_batch(small_cfg(), target)
  assert best >= 1 and report.fits and report.batch_per_device == best
  over = aot.compile_target(aot.with_micro_batch(small_cfg(), best + 1, target), target,
                            ("train_step",))
  assert not over.fits and over.programs[0].ok


@needs_cuda
def test_max_prompt_is_the_longest_prefill_that_fits(monkeypatch):
  """With about 14 MB of an RTX 3090 to use, a prefill of the whole 2048-token context does
  not fit beside the train state; the bisection stops where 128 more tokens would not."""
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.00056")
  cfg = small_cfg()
  cfg.model.max_seq_len = 2048
  target = targets.parse("rtx3090")
  best = aot.max_prompt(cfg, target)
  assert 0 < best < 2048 and best % aot.PROMPT_STEP == 0
  assert aot.compile_target(cfg, target, ("prefill",), prompt=best).fits
  assert not aot.compile_target(cfg, target, ("prefill",), prompt=best + aot.PROMPT_STEP).fits


@needs_tpu
def test_a_tpu_slice_compiles_with_splash():
  report = aot.compile_target(small_cfg(), targets.parse("v5e-8"), ("train_step", "eval_step"))
  assert report.attention == "splash" and report.mesh["fsdp"] == 8
  assert all(p.ok and p.fits for p in report.programs), aot.format_report(report)
  assert [p.kernels for p in report.programs] == [3, 1]
  assert report.programs[0].compiler_flops > 0  # libtpu's cost analysis


@needs_tpu
def test_the_8b_evaluates_its_whole_context_through_splash_on_v5p_128():
  """Perplexity at the 8B's full context (8192 tokens a row): the eval step of a v5p-128 runs
  splash and fits beside the train state."""
  cfg = recipe.load(os.path.join(REPO, "configs", "llama3_1_8b.py"), [])
  assert cfg.data.seq_len == cfg.model.max_seq_len == 8192
  report = aot.compile_target(cfg, targets.parse("v5p-128"), ("eval_step",))
  (program,) = report.programs
  assert report.attention == "splash" and program.ok and program.fits, aot.format_report(report)
  assert program.kernels == 1


@needs_cuda
def test_the_script_exits_1_when_the_recipe_does_not_fit():
  """The TinyStories recipe fits an RTX 3090 as published (batch 128) and not at 8192."""
  fits = run_script("aot_compile.py", "--config", "configs/tinystories.py", "--targets",
                    "rtx3090", "--programs", "train_step", "--json")
  assert fits.returncode == 0, fits.stderr
  (result,) = json.loads(fits.stdout)["results"]
  assert result["fits"] and 0 < result["bytes_per_device"] < result["device_memory"] * 0.75
  big = run_script("aot_compile.py", "--config", "configs/tinystories.py", "--targets", "rtx3090",
                   "--programs", "train_step", "--config.data.batch_size=8192", "--json")
  assert big.returncode == 1, big.stderr
  (result,) = json.loads(big.stdout)["results"]
  assert not result["fits"] and result["bytes_per_device"] > result["device_memory"]


# --- The roofline ---------------------------------------------------------------------------


def _compiled(target, fn, *shapes):
  """`fn` compiled for the first device of `target`, on arguments of these shapes (bf16)."""
  device = aot.devices(target)[0]
  mesh = jax.sharding.Mesh([device], ("x",))
  where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=where) for s in shapes]
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(target.platform,)).compile()


def _scan(x, w):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


@pytest.mark.parametrize("name", [
  pytest.param("h100_sxm", marks=needs_cuda), pytest.param("v5e-1", marks=needs_tpu)])
def test_one_matmul_costs_its_flops_and_at_least_its_operands(name):
  m, k, n = 1024, 2048, 4096
  compiled = _compiled(targets.parse(name), lambda a, b: a @ b, (m, k), (k, n))
  costs = roofline.hlo_costs(compiled.as_text())
  assert costs.flops == 2 * m * n * k
  least = (m * k + k * n + m * n) * 2
  if name.startswith("h100"):
    assert costs.bytes == least  # one cuBLAS/Triton GEMM: its operands and its output
  else:
    assert least <= costs.bytes <= 1.5 * least  # libtpu copies an operand into its layout


@needs_tpu
def test_libtpu_counts_a_loop_once_and_the_roofline_every_trip():
  """A scan of 10 matmuls: libtpu's cost_analysis() reports the FLOPs of one, the HLO walk
  those of ten (a model whose layers are a scan would otherwise look 1/L as costly)."""
  compiled = _compiled(targets.parse("v5e-1"), _scan, (1024, 2048), (10, 2048, 2048))
  one = 2 * 1024 * 2048 * 2048
  assert compiled.cost_analysis()["flops"] == pytest.approx(one, rel=0.01)
  costs = roofline.hlo_costs(compiled.as_text())
  assert costs.loops == [10] and costs.flops == 10 * one


@needs_cuda
def test_the_gpu_train_step_counts_the_models_flops_and_its_bound_is_the_slowest_part():
  """On one GPU the contractions of the compiled train step are the model's matmuls (its
  attention runs in our kernel, whose FLOPs the HLO does not show)."""
  cfg = small_cfg()
  cfg.model.attention = "xla"
  target = targets.parse("rtx3090")
  (train,) = aot.compile_target(cfg, target, ("train_step",)).programs
  tokens = 8 * 128
  causal = 3 * 2 * 4 * 128 * (128 + 1) / 2 * tokens  # the model's attention: 3 x L x 4 x D x ...
  # XLA's attention computes the masked scores too (every query against all 128 keys), in the
  # forward at least: the compiled step does the model's matmuls and at most that much more.
  full = 3 * 2 * 4 * 128 * 128 * tokens
  assert train.flops < train.hlo_flops <= train.flops - causal + full
  assert train.compute_s == train.flops / target.peak_flops
  assert train.memory_s == train.bytes_accessed / target.memory_bandwidth
  assert train.step_s == max(train.compute_s, train.memory_s, train.collective_s) > 0
  assert train.collective_bytes == 0 and train.tokens == 8 * 128
  assert train.tokens_per_s == pytest.approx(8 * 128 / train.step_s)
  assert 0 < train.mfu_ceiling <= 1


@needs_tpu
def test_the_sweep_ranks_sizings_that_keep_the_global_batch():
  cfg = small_cfg(batch_size=16)
  target = targets.parse("v5e-4")
  ranked = aot.sweep(cfg, target)
  meshes = {(s.data, s.fsdp, s.tensor) for s, _ in ranked}
  assert meshes == {(1, 4, 1), (2, 2, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)}
  for s, program in ranked:
    assert s.per_device * s.grad_accum * s.data * s.fsdp == 16 and program.fits
  assert [p.step_s for _, p in ranked] == sorted(p.step_s for _, p in ranked)
  # Data parallelism over 4 chips sends the gradients' all-reduce; FSDP gathers the weights.
  sent = {(s.data, s.fsdp, s.tensor): p.collective_bytes for s, p in ranked}
  assert all(b > 0 for b in sent.values())


def test_every_json_field_of_a_program_is_documented():
  text = open(os.path.join(REPO, "docs", "performance.md"), encoding="utf-8").read()
  missing = [f.name for f in dataclasses.fields(aot.Program) if f"`{f.name}`" not in text]
  assert not missing, f"docs/performance.md does not name the JSON fields {missing}"
  assert re.search(r"`mfu_ceiling`", text)

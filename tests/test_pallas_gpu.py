"""The Pallas attention kernels built for CUDA GPUs on a CPU host: every tile-table entry lowers
to its three Triton kernels with its tiles, and, with the CUDA plugin (the `aot` extra), XLA's
GPU compiler builds every entry for its generation within the shared memory a block may use
(kernel_check, scripts/check_gpu_kernels.py)."""

import importlib.util
import json
import os
import re
import runpy

import jax.numpy as jnp
import pytest
from helpers import REPO, run_script

# JAX has no public API for the Triton module inside a lowered Pallas kernel.
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect

from nanollama_jax import aot, errors, targets
from nanollama_jax import kernel_check
from nanollama_jax.attention import pallas
from nanollama_jax.attention.pallas import Blocks, Tiles

NAMES = [f"flash_attention_{kernel}" for kernel in kernel_check.KERNELS]
# How newer jaxlibs refuse to lower a Pallas Triton kernel for CUDA without the CUDA plugin.
NO_TRITON_HANDLER = "does not have a Triton compilation handler"
needs_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                  reason='compiling for a GPU needs the CUDA plugin: pip install '
                                         '-e ".[aot]"')
# Before the table was compiled, sm_90 at head dim 128 ran these tiles in all three kernels.
OLD_H100 = Tiles(*[Blocks(128, 128, 8, 3)] * 3)
_captured = {}


def _module(call) -> tuple[str, str, int, int]:
  """(name, Triton module as MLIR text, warps, stages) of one Triton custom call."""
  config = ir.DictAttr(call.attributes["mhlo.backend_config"])
  context = mlir.JaxIrContext()
  context.append_dialect_registry(mlir.upstream_dialects)
  tt_dialect.register_dialect(context)
  context.load_all_available_dialects()
  with context:
    text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
  return (ir.StringAttr(config["name"]).value, text, ir.IntegerAttr(config["num_warps"]).value,
          ir.IntegerAttr(config["num_stages"]).value)


def _triton_calls(op) -> list:
  """The Triton custom calls under `op`, in program order."""
  calls = []
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        if (child.operation.name == "stablehlo.custom_call" and
            ir.StringAttr(child.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"):
          calls.append(child.operation)
        calls += _triton_calls(child.operation)
  return calls


def capture(dtype, head_dim, generation, **kwargs):
  """The Triton modules of causal packed attention over T = 200 and its gradients."""
  tiles = kwargs.pop("tiles", None) or pallas.choose_tiles(head_dim, dtype, False, generation)
  key = (dtype, head_dim, tiles, tuple(sorted(kwargs.items())))  # the generation only picks tiles
  if key not in _captured:
    try:
      lowered = kernel_check.lower_attention(dtype, head_dim, generation, tiles=tiles, **kwargs)
    except RuntimeError as e:
      if NO_TRITON_HANDLER not in str(e):
        raise
      pytest.skip(f"this jaxlib cannot lower Pallas Triton kernels for CUDA here: {e}")
    stablehlo = lowered.compiler_ir("stablehlo").operation
    _captured[key] = [_module(call) for call in _triton_calls(stablehlo)]
  return _captured[key]


@pytest.mark.parametrize("generation", pallas.GENERATIONS)
def test_every_table_entry_lowers_to_three_triton_kernels_with_its_tiles(generation):
  for dtype in kernel_check.DTYPES:
    for head_dim in pallas.HEAD_DIMS:
      tiles = pallas.choose_tiles(head_dim, dtype, False, generation)
      modules = capture(dtype, head_dim, generation)
      assert [m[0] for m in modules] == NAMES
      t = {"bfloat16": "bf16", "float32": "f32"}[dtype]
      for (_, text, warps, stages), blocks, transposed in zip(
          modules, (tiles.fwd, tiles.dq, tiles.dkv), (False, False, True)):
        assert (warps, stages) == (blocks.num_warps, blocks.num_stages)
        rows, cols = ((blocks.block_k, blocks.block_q) if transposed
                      else (blocks.block_q, blocks.block_k))
        # The first dot is the scores: q k^T (k q^T in the dk/dv kernel), rows x head dim x cols.
        first_dot = re.search(r"tt\.dot [^\n]*", text).group(0)
        assert (f"tensor<{rows}x{head_dim}x{t}> * tensor<{head_dim}x{cols}x{t}> -> "
                f"tensor<{rows}x{cols}xf32>") in first_dot, (generation, dtype, head_dim)
  forward = capture("bfloat16", 64, generation, backward=False)
  assert [m[0] for m in forward] == NAMES[:1]


def test_float32_dots_run_in_tf32_and_bfloat16_dots_in_bfloat16():
  for dtype, operand in (("float32", "f32"), ("bfloat16", "bf16")):
    modules = capture(dtype, 64, "sm_90")
    dots = [re.findall(r"tt\.dot [^\n]*", text) for _, text, _, _ in modules]
    assert [len(d) for d in dots] == [2, 3, 4]  # fwd: qk, pv; dq: qk, dp, dq; dkv: + dv
    for dot in sum(dots, []):
      assert "inputPrecision = tf32" in dot
      assert re.search(rf"tensor<\w+x{operand}> \* tensor<\w+x{operand}> -> tensor<\w+xf32>", dot)


def test_generations_map_to_table_rows_and_unknown_ones_get_the_smallest_tiles():
  assert pallas.GENERATIONS == tuple(targets.GPU_GENERATIONS)
  assert [pallas.table_row(g) for g in ("sm_80", "sm_87", "sm_86", "sm_89", "sm_90", "sm_100",
                                        "sm_103", "sm_120", "sm_121")] == [
    "sm_80", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_100", "sm_120", "sm_120"]
  assert pallas.table_row("sm_110") is None and pallas.table_row("sm_130") is None
  with pytest.raises(ValueError, match=r"needs an sm_80\+ GPU; this one is sm_75: use "
                                       "model.attention='xla'"):
    pallas.choose_tiles(128, jnp.bfloat16, False, "sm_75")
  with pytest.raises(ValueError, match="GPU generation 'hopper': expected sm_ and the compute "
                                       "capability's digits, like 'sm_90'"):
    pallas.table_row("hopper")
  for generation in ("sm_110", "sm_130"):
    with pytest.warns(UserWarning, match=f"no pallas attention tiles for GPU generation "
                                         f"{generation} .*: using the smallest safe tiles"):
      tiles = pallas.choose_tiles(128, jnp.float32, False, generation)
    assert tiles == pallas.fallback_tiles("float32", 128)
  assert (pallas.choose_tiles(64, jnp.float16, False, "sm_90")
          == pallas._TABLE[("sm_90", "bfloat16", 64)])
  assert len(pallas._TABLE) == len(pallas.GENERATIONS) * 2 * len(pallas.HEAD_DIMS)


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("generation", pallas.GENERATIONS)
def test_xla_compiles_every_table_entry_within_shared_memory(generation):
  entries = kernel_check.check([generation])
  print(kernel_check.format_table(entries))
  assert len(entries) == len(kernel_check.DTYPES) * len(pallas.HEAD_DIMS)
  refused = [e for e in entries if not e.ok]
  assert not refused, kernel_check.format_table(refused)
  for e in entries:
    assert e.limit == targets.shared_memory_limit(generation)
    assert [k.kernel for k in e.kernels] == list(kernel_check.KERNELS)
    assert all(0 < k.shared <= e.limit and 32 <= k.registers <= 255 for k in e.kernels)


@needs_plugin
def test_the_smallest_tiles_fit_the_smallest_shared_memory():
  """What an unknown GPU gets fits the 99 KB of the smallest GPUs, built for the newest ones."""
  smallest = min(targets.shared_memory_limit(g) for g in pallas.GENERATIONS)
  for generation in ("sm_100", "sm_120"):
    for dtype in kernel_check.DTYPES:
      for head_dim in pallas.HEAD_DIMS:
        entry = kernel_check.check_entry(generation, dtype, head_dim,
                                         pallas.fallback_tiles(dtype, head_dim))
        assert entry.ok, kernel_check.format_table([entry])
        assert max(k.shared for k in entry.kernels) <= smallest


@needs_plugin
def test_xla_refuses_the_old_h100_tiles_and_names_the_kernels():
  """128 x 128 tiles, 8 warps, 3 stages in all three kernels at head dim 128: the backward
  kernels need more than the 232,448 bytes an H100 block may use."""
  entry = kernel_check.check_entry("sm_90", "bfloat16", 128, OLD_H100)
  print(kernel_check.format_table([entry]))
  assert not entry.ok
  # XLA compiles the kernels in parallel: the whole entry fails on whichever it meets first.
  assert re.match(r"RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested "
                  r"26(3168|5216), available: 232448", entry.error)
  fwd, dq, dkv = entry.kernels
  assert (fwd.error, fwd.shared) == (None, 230_400)
  assert dq.shared is None and "requested 263168, available: 232448" in dq.error
  assert dkv.shared is None and "requested 265216, available: 232448" in dkv.error


@needs_plugin
def test_script_prints_json_with_progress():
  done = run_script("check_gpu_kernels.py", "--json", "--generations", "sm_86", "--head-dims",
                    "32", "--dtypes", "bfloat16")
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert result["failed"] == 0 and result["total_s"] > 0
  [entry] = result["entries"]
  assert (entry["generation"], entry["gpu"], entry["ok"], entry["limit"]) == (
    "sm_86", "rtx3090", True, 101_376)
  assert [(k["kernel"], k["shared"], k["error"]) for k in entry["kernels"]] == [
    ("fwd", 25_088, None), ("dq", 24_832, None), ("dkv", 25_344, None)]
  assert "[1/1] sm_86 (rtx3090) bfloat16 head dim 32: compiled in" in done.stderr


@pytest.mark.slow
def test_script_refuses_unknown_generations():
  refused = run_script("check_gpu_kernels.py", "--generations", "sm_75")
  assert refused.returncode == 2 and "sm_75: allowed sm_80, sm_86" in refused.stderr


def _main(argv):
  """scripts/check_gpu_kernels.py's main(argv) run in this process: its exit status."""
  script = runpy.run_path(os.path.join(REPO, "scripts", "check_gpu_kernels.py"))
  with pytest.raises(SystemExit) as exit_:
    script["errors"].cli(lambda: script["main"](argv))
  return exit_.value.code


@needs_plugin
def test_script_exits_1_when_xla_refuses_an_entry(monkeypatch, capsys):
  monkeypatch.setitem(pallas._TABLE, ("sm_90", "bfloat16", 128), OLD_H100)
  assert _main(["--generations", "sm_90", "--head-dims", "128", "--dtypes", "bfloat16"]) == 1
  out = capsys.readouterr().out
  assert "0 of 1 entries compiled" in out and out.count(" NO") == 2
  assert "dq: RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 263168" in out


def test_script_exits_2_in_one_line_when_the_compiler_is_unavailable(monkeypatch, capsys):
  def unavailable(target):
    raise errors.InstallError(f"cannot describe {target.name} to a compiler: "
                              f"{errors.install_command('aot')}")

  monkeypatch.setattr(aot, "devices", unavailable)
  assert _main(["--generations", "sm_86", "--head-dims", "32", "--dtypes", "bfloat16"]) == 2
  err = capsys.readouterr().err
  assert err == ("install error: cannot describe rtx3090 to a compiler: pip install "
                 "'nanollama_jax[aot]' (or pip install -e \".[aot]\" in a clone)\n")


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is not None,
                    reason="the CUDA plugin is installed")
@pytest.mark.slow
def test_script_without_the_cuda_plugin_exits_2_naming_the_extra():
  done = run_script("check_gpu_kernels.py", "--generations", "sm_86")
  assert done.returncode == 2 and done.stdout == ""
  assert done.stderr.startswith("install error: compiling for rtx3090 needs jax_cuda12_plugin: ")
  assert done.stderr.count("\n") == 1 and 'pip install -e ".[aot]"' in done.stderr

"""The Pallas attention kernels built for CUDA GPUs on a CPU host (gpu_check): every tile-table
entry lowers to its three Triton kernels, and, with the triton package (the `gpu-check` extra),
every kernel compiles to cubin within its GPU's shared memory with headroom to spare."""

import json
import os
import re
import runpy

import jax.numpy as jnp
import pytest
from helpers import REPO, run_script

from nanollama_jax.attention import gpu_check, pallas
from nanollama_jax.attention.pallas import Blocks, Tiles

NAMES = [f"flash_attention_{kernel}" for kernel in gpu_check.KERNELS]
_captured = {}


def capture(dtype, head_dim, generation, **kwargs):
  """The Triton modules of causal packed attention over T = 200 and its gradients."""
  tiles = kwargs.pop("tiles", None) or pallas.choose_tiles(head_dim, dtype, False, generation)
  key = (dtype, head_dim, tiles, tuple(sorted(kwargs.items())))  # the generation only picks tiles
  if key not in _captured:
    try:
      lowered = gpu_check.lower_attention(dtype, head_dim, generation, tiles=tiles, **kwargs)
    except RuntimeError as e:
      if gpu_check.NO_TRITON_HANDLER not in str(e):
        raise
      pytest.skip(f"this jaxlib cannot lower Pallas Triton kernels for CUDA here: {e}")
    _captured[key] = gpu_check.capture(lowered)
  return _captured[key]


def needs_triton():
  pytest.importorskip("triton", reason='compiling kernels to cubin needs the triton package: '
                                       'pip install -e ".[gpu-check]"')


@pytest.mark.parametrize("generation", pallas.GENERATIONS)
def test_every_table_entry_lowers_to_three_triton_kernels_with_its_tiles(generation):
  for dtype in gpu_check.DTYPES:
    for head_dim in pallas.HEAD_DIMS:
      tiles = pallas.choose_tiles(head_dim, dtype, False, generation)
      modules = capture(dtype, head_dim, generation)
      assert [m.name for m in modules] == NAMES
      t = {"bfloat16": "bf16", "float32": "f32"}[dtype]
      for module, blocks, transposed in zip(modules, (tiles.fwd, tiles.dq, tiles.dkv),
                                            (False, False, True)):
        assert (module.num_warps, module.num_stages) == (blocks.num_warps, blocks.num_stages)
        rows, cols = ((blocks.block_k, blocks.block_q) if transposed
                      else (blocks.block_q, blocks.block_k))
        # The first dot is the scores: q k^T (k q^T in the dk/dv kernel), rows x head dim x cols.
        first_dot = re.search(r"tt\.dot [^\n]*", module.ir).group(0)
        assert (f"tensor<{rows}x{head_dim}x{t}> * tensor<{head_dim}x{cols}x{t}> -> "
                f"tensor<{rows}x{cols}xf32>") in first_dot, (generation, dtype, module.name)
  forward = capture("bfloat16", 64, generation, backward=False)
  assert [m.name for m in forward] == NAMES[:1]


def test_float32_dots_run_in_tf32_and_bfloat16_dots_in_bfloat16():
  for dtype, operand in (("float32", "f32"), ("bfloat16", "bf16")):
    modules = capture(dtype, 64, "sm_90")
    dots = [re.findall(r"tt\.dot [^\n]*", m.ir) for m in modules]
    assert [len(d) for d in dots] == [2, 3, 4]  # fwd: qk, pv; dq: qk, dp, dq; dkv: + dv
    for dot in sum(dots, []):
      assert "inputPrecision = tf32" in dot
      assert re.search(rf"tensor<\w+x{operand}> \* tensor<\w+x{operand}> -> tensor<\w+xf32>", dot)


def test_generations_map_to_table_rows_and_unknown_ones_get_the_smallest_tiles():
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
    assert tiles == pallas._fallback_tiles("float32", 128)
  assert (pallas.choose_tiles(64, jnp.float16, False, "sm_90")
          == pallas._TABLE[("sm_90", "bfloat16", 64)])
  assert len(pallas._TABLE) == len(pallas.GENERATIONS) * 2 * len(pallas.HEAD_DIMS)


@pytest.mark.parametrize("generation", pallas.GENERATIONS)
def test_every_kernel_compiles_to_cubin_within_shared_memory(generation):
  needs_triton()
  entries = gpu_check.check([generation])
  print(gpu_check.format_table(entries))
  assert len(entries) == len(gpu_check.KERNELS) * len(gpu_check.DTYPES) * len(pallas.HEAD_DIMS)
  too_big = [e for e in entries if not e.fits]
  assert not too_big, gpu_check.format_table(too_big)
  assert all(e.resources.shared > 0 and 32 <= e.resources.registers <= 255 for e in entries)


def test_the_smallest_tiles_fit_the_smallest_shared_memory():
  """What an unknown GPU gets fits 99 KB with headroom, built for the newest known GPUs."""
  needs_triton()
  smallest = min(pallas.SHARED_MEMORY_LIMITS.values())
  for dtype in gpu_check.DTYPES:
    for head_dim in pallas.HEAD_DIMS:
      tiles = pallas._fallback_tiles(dtype, head_dim)
      for generation in ("sm_100", "sm_120"):
        modules = capture(dtype, head_dim, generation, tiles=tiles)
        for kernel, module in zip(gpu_check.KERNELS, modules):
          entry = gpu_check.Entry(kernel, dtype, head_dim, generation, getattr(tiles, kernel),
                                  gpu_check.compile_module(module, generation), smallest)
          assert entry.fits, gpu_check.format_table([entry])


def test_the_check_catches_the_old_h100_tiles():
  """Before the table was compiled, sm_90 at head dim 128 ran 128 x 128 tiles, 8 warps, 3 stages
  in all three kernels: dq needed 263,168 bytes of the 232,448 an H100 block may use."""
  needs_triton()
  old = Blocks(128, 128, 8, 3)
  modules = capture("bfloat16", 128, "sm_90", tiles=Tiles(old, old, old))
  shared = [gpu_check.compile_module(m, "sm_90").shared for m in modules]
  print(shared)
  assert shared[:2] == [230_400, 263_168]
  assert shared[1] > pallas.SHARED_MEMORY_LIMITS["sm_90"]


def test_script_prints_the_table_as_json_with_progress():
  needs_triton()
  done = run_script("check_gpu_kernels.py", "--json", "--generations", "sm_86", "--head-dims",
                    "32", "--dtypes", "bfloat16")
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert result["failed"] == 0 and result["headroom"] == gpu_check.HEADROOM
  assert [(e["kernel"], e["generation"], e["fits"]) for e in result["entries"]] == [
    ("fwd", "sm_86", True), ("dq", "sm_86", True), ("dkv", "sm_86", True)]
  assert "[3/3] dkv bfloat16 head dim 32 sm_86" in done.stderr
  refused = run_script("check_gpu_kernels.py", "--generations", "sm_75")
  assert refused.returncode == 2 and "sm_75: allowed sm_80, sm_86" in refused.stderr


def test_script_exits_non_zero_when_a_kernel_does_not_fit(monkeypatch, capsys):
  needs_triton()
  monkeypatch.setattr(gpu_check, "HEADROOM", 0.999)  # no kernel leaves 99.9% of the GPU spare
  main = runpy.run_path(os.path.join(REPO, "scripts", "check_gpu_kernels.py"))["main"]
  with pytest.raises(SystemExit) as exit_:
    main(["--generations", "sm_86", "--head-dims", "32", "--dtypes", "bfloat16"])
  assert exit_.value.code == 1
  out = capsys.readouterr().out
  assert "0 of 3 kernels fit with 100% of shared memory to spare" in out and out.count(" NO") == 3

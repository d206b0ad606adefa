"""The hardware table (targets.py): names, slices, generated GPU target configs, usable memory.

These need no accelerator and no extra; tests/test_aot.py has XLA and libtpu compile them.
"""

import json
import re

import pytest

from helpers import run_script
from nanollama_jax import errors, targets

# The fields of XLA's GpuDeviceInfoProto (jaxlib 0.10.2) that the generator may write; a field
# outside it (e.g. the newer collective_memory_granularity) makes XLA refuse the whole config.
_DEVICE_INFO_FIELDS = {
  "threads_per_block_limit", "threads_per_warp", "shared_memory_per_block",
  "shared_memory_per_core", "threads_per_core_limit", "core_count", "fpus_per_core",
  "block_dim_limit_x", "block_dim_limit_y", "block_dim_limit_z", "memory_bandwidth",
  "l2_cache_size", "clock_rate_ghz", "device_memory_size", "shared_memory_per_block_optin",
  "cuda_compute_capability", "registers_per_core_limit", "registers_per_block_limit",
  "thread_dim_limit_x", "thread_dim_limit_y", "thread_dim_limit_z", "name"}


def _parse_text_proto(text):
  """Protocol buffer text format as nested dicts (enough of the grammar for a target config)."""
  tokens = re.findall(r'"[^"]*"|[{}]|[\w.]+:?', text)
  stack, top = [], {}
  node = top
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if token == "}":
      node = stack.pop()
    elif token.endswith(":"):
      value = tokens[i + 1]
      node[token[:-1]] = value.strip('"') if value.startswith('"') else value
      i += 1
    else:
      assert tokens[i + 1] == "{", (token, tokens[i + 1])
      child = node[token] = {}
      stack.append(node)
      node = child
      i += 1
    i += 1
  assert not stack, "unbalanced braces"
  return top


@pytest.mark.parametrize("name", list(targets.GPUS))
def test_every_gpu_target_config_is_well_formed_and_carries_the_table(name):
  gpu = targets.GPUS[name]
  parsed = _parse_text_proto(targets.gpu_target_config(gpu))
  assert set(parsed) == {"gpu_device_info", "platform_name", "dnn_version_info",
                         "device_description_str"}
  info = parsed["gpu_device_info"]
  assert set(info) <= _DEVICE_INFO_FIELDS
  generation = targets.GPU_GENERATIONS[gpu.generation]
  assert (int(info["core_count"]), int(info["device_memory_size"])) == (gpu.sms, gpu.memory)
  assert int(info["shared_memory_per_block_optin"]) == generation.shared_per_block
  capability = info["cuda_compute_capability"]
  assert f"sm_{capability['major']}{capability['minor']}" == gpu.generation
  assert parsed["device_description_str"] == info["name"] == gpu.kind
  assert parsed["platform_name"] == "CUDA"


@pytest.mark.parametrize("name, devices, hosts, topology", [
  ("v4-8", 4, 1, "2x2x1"), ("v4-32", 16, 4, "2x2x4"), ("v5p-8", 4, 1, "2x2x1"),
  ("v5p-128", 64, 16, "4x4x4"), ("v5p-256", 128, 32, "4x4x8"), ("v5e-1", 1, 1, "1x1"),
  ("v5e-8", 8, 1, "2x4"), ("v5e-256", 256, 64, "16x16"), ("v6e-8", 8, 1, "2x4"),
  ("v6e-64", 64, 16, "8x8"), ("v6e-256", 256, 64, "16x16")])
def test_tpu_slices_by_their_cloud_names(name, devices, hosts, topology):
  """v4 and v5p names count TensorCores (2 per chip), v5e and v6e chips; slices over 8 chips
  (2D) or 4 (3D) span hosts of 4 chips."""
  t = targets.parse(name)
  assert (t.platform, t.devices, t.hosts, t.topology) == ("tpu", devices, hosts, topology)


@pytest.mark.parametrize("name, devices, hosts", [("h100_sxm", 1, 1), ("h100_sxm:8", 8, 1),
                                                  ("a100_80gb:2x8", 16, 2)])
def test_gpu_counts(name, devices, hosts):
  t = targets.parse(name)
  assert (t.platform, t.generation, t.devices, t.hosts) == (
    "cuda", targets.GPUS[name.split(":")[0]].generation, devices, hosts)


@pytest.mark.parametrize("name, message", [
  ("rtx3080", "unknown target 'rtx3080': known GPUs a100_40gb,"),
  ("h100_sxm:0", "the count after ':' is DEVICES or HOSTSxDEVICES"),
  ("h100_sxm:8x", "the count after ':' is DEVICES or HOSTSxDEVICES"),
  ("v5p-7", "v5p names count TensorCores, 2 per chip"),
  ("v5e-6", "6 chips: a 2D slice has a power of two"),
  ("v7-8", "unknown TPU generation 'v7'; known: v4, v5e, v5p, v6e")])
def test_unknown_names_are_refused_with_what_is_known(name, message):
  with pytest.raises(errors.TargetError, match=re.escape(message)):
    targets.parse(name)


def test_a_gpu_program_may_use_jax_preallocated_share(monkeypatch):
  rtx3090 = targets.parse("rtx3090")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert rtx3090.usable_memory() == int(0.75 * 25_438_715_904)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert rtx3090.usable_memory() == int(0.9 * 25_438_715_904)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
  with pytest.raises(errors.TargetError, match=r"must be in \(0, 1\]"):
    rtx3090.usable_memory()
  assert targets.parse("v5e-8").usable_memory() == int(16 * 2**30 * 0.97)


def test_gpu_generations_of_compute_capabilities_and_their_gpus():
  assert [targets.gpu_generation(c) for c in ("8.6", "9.0", "10.3", "12.0", None)] == [
    "sm_86", "sm_90", "sm_103", "sm_120", "sm_80"]  # None: a runtime that does not say
  assert [targets.known_gpu_generation(g) for g in ("sm_80", "sm_87", "sm_103", "sm_121",
                                                    "sm_110")] == [
    "sm_80", "sm_80", "sm_100", "sm_120", None]
  # kernel_check compiles each generation for the first of its GPUs
  assert {g: targets.gpu_of_generation(g) for g in targets.GPU_GENERATIONS} == {
    "sm_80": "a100_40gb", "sm_86": "rtx3090", "sm_89": "rtx4090", "sm_90": "h100_sxm",
    "sm_100": "b200", "sm_120": "rtx5090"}


@pytest.mark.slow
def test_list_targets_and_usage_errors_need_no_extra():
  listed = run_script("aot_compile.py", "--list-targets", "--json")
  assert listed.returncode == 0, listed.stderr
  rows = {r["target"]: r for r in json.loads(listed.stdout)["targets"]}
  assert set(targets.GPUS) | set(targets.NAMED_SLICES) == set(rows)
  assert rows["v5p-128"]["devices"] == 64 and rows["rtx3090"]["generation"] == "sm_86"
  unknown = run_script("aot_compile.py", "--config", "configs/tinystories.py", "--targets",
                       "rtx3090,nope")
  # The last line: with the aot extra, the CUDA plugin logs its start-up before it.
  assert unknown.returncode == 2
  assert unknown.stderr.splitlines()[-1].startswith("usage error: unknown target 'nope'")
  typo = run_script("aot_compile.py", "--config", "configs/tinystories.py", "--targets", "rtx3090",
                    "--config.model.dimm=3")
  assert typo.returncode == 2
  assert typo.stderr.splitlines()[-1].startswith(
    "config error: unknown config key 'model.dimm'; did you mean model.dim")

"""The hardware we name, as facts: GPU generations and cards, TPU chips and slices.

One table per kind of device, and everything else derived from it: the GPU target configs XLA
compiles for without a GPU (`gpu_target_config`), the TPU topologies libtpu compiles for
without a TPU, the device memory a program may use, and the peak FLOP/s that MFU is measured
against (`peak_flops`, by the device kind a running device reports).

A target is named `NAME[:COUNT]` for GPUs (`h100_sxm`, `h100_sxm:8` for one host of 8,
`a100_80gb:2x8` for 2 hosts of 8) and by its Cloud name for TPU slices (`v5e-8`, `v5p-128`:
v4 and v5p names count TensorCores, two per chip; v5e and v6e names count chips).

Sources: NVIDIA's datasheets and whitepapers (A100, H100, H200, B200, L40S, RTX A6000; the
Ampere GA102, Ada AD102 and Blackwell GB202 whitepapers for the GeForce cards, whose bf16
rate with fp32 accumulation is what XLA uses), the CUDA C++ Programming Guide's "Technical
Specifications per Compute Capability" for shared memory and threads, and Google Cloud's TPU
system architecture pages for HBM, its bandwidth, the bidirectional ICI bandwidth and peak bf16
FLOP/s per chip (v4's ICI is not on its page: 300 GB/s, six links of 50 GB/s as the TPU v4
paper, ISCA 2023, describes them, is assumed). Memory sizes are what the
driver reports (a little under the marketed size) where XLA's own device specs record it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from nanollama_jax import errors

GiB = 1024**3
# JAX on a GPU preallocates this share of the device's memory for XLA's programs by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); the rest serves the CUDA context, cuBLAS/cuDNN workspaces
# and NCCL's buffers.
DEFAULT_GPU_MEMORY_FRACTION = 0.75
# libtpu keeps a little HBM for itself (program code, runtime scratch); the compiler refuses a
# program over the rest. Judged with this share to spare.
TPU_HBM_RESERVE = 0.03


@dataclasses.dataclass(frozen=True)
class GpuGeneration:
  """What a CUDA compute capability allows per block and per SM."""
  major: int
  minor: int
  shared_per_block: int  # bytes a block may opt in to (less the 1 KB the driver reserves)
  shared_per_sm: int  # bytes
  threads_per_sm: int
  accelerated: bool = False  # the 'a' variant (sm_90a, sm_100a): wgmma, TMA, tcgen05


# Compute capabilities: 8.0 and 8.7 have 164 KB of shared memory per SM, 8.6, 8.9 and 12.x
# 100 KB, 9.0 and 10.x 228 KB; a block may opt in to all but 1 KB of it.
GPU_GENERATIONS: dict[str, GpuGeneration] = {
  "sm_80": GpuGeneration(8, 0, 166_912, 167_936, 2048),
  "sm_86": GpuGeneration(8, 6, 101_376, 102_400, 1536),
  "sm_89": GpuGeneration(8, 9, 101_376, 102_400, 1536),
  "sm_90": GpuGeneration(9, 0, 232_448, 233_472, 2048, accelerated=True),
  "sm_100": GpuGeneration(10, 0, 232_448, 233_472, 2048, accelerated=True),
  "sm_120": GpuGeneration(12, 0, 101_376, 102_400, 1536),
}
# Compute capabilities that behave as a generation of the table: Jetson Orin (8.7) has A100's
# shared memory and instructions; B300 (10.3) is a B200; GB10 (12.1) is a consumer Blackwell.
GPU_GENERATION_ALIASES = {"sm_87": "sm_80", "sm_103": "sm_100", "sm_121": "sm_120"}


# Bytes/s one device sends, each direction (collectives move data both ways at once): PCIe 4.0
# and 5.0 x16 links; NVLink 3 (A100: 600 GB/s in both directions), 4 (H100, H200: 900 GB/s) and
# 5 (B200: 1.8 TB/s), from NVIDIA's datasheets. Between hosts: one 400 Gb/s InfiniBand NDR
# adapter per GPU, as in NVIDIA's DGX H100 (an assumption: clusters differ; A100 systems: one
# 200 Gb/s HDR adapter per GPU, as in the DGX A100).
PCIE4, PCIE5 = 32e9, 64e9
INTER_HOST = {"sm_80": 25e9}
INTER_HOST_DEFAULT = 50e9


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU model."""
  kind: str  # jax.Device.device_kind as the driver reports it
  generation: str  # a key of GPU_GENERATIONS
  sms: int
  memory: int  # bytes
  bandwidth: float  # bytes/s
  clock_ghz: float  # boost clock
  l2: int  # bytes
  peak_flops: float  # dense bf16 matmul, fp32 accumulation
  match: str  # what the device kind of this GPU contains ("H100 PCIe")
  link: float = PCIE4  # bytes/s one GPU sends to the others of its host (NVLink, else PCIe)
  registers_per_sm: int = 65_536


GPUS: dict[str, Gpu] = {
  "a100_40gb": Gpu("NVIDIA A100-SXM4-40GB", "sm_80", 108, 42_331_013_120, 1.555e12, 1.41,
                   40 * 2**20, 312e12, "A100", link=300e9),
  "a100_80gb": Gpu("NVIDIA A100-SXM4-80GB", "sm_80", 108, 85_198_045_184, 2.039e12, 1.41,
                   40 * 2**20, 312e12, "A100", link=300e9),
  "rtx3090": Gpu("NVIDIA GeForce RTX 3090", "sm_86", 82, 25_438_715_904, 936e9, 1.695,
                 6 * 2**20, 71e12, "RTX 3090"),
  "a6000": Gpu("NVIDIA RTX A6000", "sm_86", 84, 51_041_271_808, 768e9, 1.8, 6 * 2**20,
               154.8e12, "RTX A6000"),
  "rtx4090": Gpu("NVIDIA GeForce RTX 4090", "sm_89", 128, 25_393_692_672, 1.008e12, 2.52,
                 72 * 2**20, 165.2e12, "RTX 4090"),
  "l40s": Gpu("NVIDIA L40S", "sm_89", 142, 47_697_362_944, 864e9, 2.52, 96 * 2**20, 362e12, "L40S"),
  "h100_sxm": Gpu("NVIDIA H100 80GB HBM3", "sm_90", 132, 84_942_979_072, 3.352e12, 1.98,
                  50 * 2**20, 989e12, "H100", link=450e9),
  "h100_pcie": Gpu("NVIDIA H100 PCIe", "sm_90", 114, 84_942_979_072, 2.0e12, 1.755, 50 * 2**20,
                   756e12, "H100 PCIe", link=PCIE5),
  "h200": Gpu("NVIDIA H200", "sm_90", 132, 151_397_597_184, 4.8e12, 1.98, 50 * 2**20, 989e12, "H200",
               link=450e9),
  "b200": Gpu("NVIDIA B200", "sm_100", 148, 191_514_411_008, 7.672e12, 1.965, 126 * 2**20,
              2.25e15, "B200", link=900e9),
  "rtx5090": Gpu("NVIDIA GeForce RTX 5090", "sm_120", 170, 33_667_547_136, 1.792e12, 2.41,
                 96 * 2**20, 209.5e12, "RTX 5090", link=PCIE5),
}


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation."""
  kinds: tuple[str, ...]  # jax.Device.device_kind values it reports
  topology_prefix: str  # libtpu's name for it in a topology ('v5e:2x4')
  hbm: int  # bytes per chip
  peak_flops: float  # bf16 per chip
  bandwidth: float  # HBM bytes/s per chip
  ici: float  # inter-chip interconnect bytes/s per chip, both directions together
  dims: int  # 2 (v5e, v6e: a 2D torus) or 3
  cores_per_chip_in_name: int  # v4-8 and v5p-8 name 8 TensorCores = 4 chips
  chip_config: str = "default"  # v4: 'megacore', one JAX device per chip as on a real v4


TPUS: dict[str, TpuChip] = {
  "v4": TpuChip(("TPU v4",), "v4", 32 * GiB, 275e12, 1200e9, 300e9, 3, 2,
                chip_config="megacore"),
  "v5e": TpuChip(("TPU v5 lite", "TPU v5e"), "v5e", 16 * GiB, 197e12, 819e9, 400e9, 2, 1),
  "v5p": TpuChip(("TPU v5", "TPU v5p"), "v5", 95 * GiB, 459e12, 2765e9, 1200e9, 3, 2),
  "v6e": TpuChip(("TPU v6 lite", "TPU v6e"), "v6e", 32 * GiB, 918e12, 1638e9, 800e9, 2, 1),
}
# The slices shown by --list-targets; any size with a standard topology is accepted.
NAMED_SLICES = ("v4-8", "v4-32", "v5e-8", "v5e-256", "v5p-8", "v5p-128", "v6e-8", "v6e-256")
# Chips per host of a multi-host slice (x, y, z); a slice of at most 8 chips (v5e, v6e: 2D) or
# 4 (v4, v5p: 3D) is one host.
HOST_BOUNDS = (2, 2, 1)
SINGLE_HOST_CHIPS = {2: 8, 3: 4}


@dataclasses.dataclass(frozen=True)
class Target:
  """A named target: a GPU model and its hosts x devices, or a TPU slice."""
  name: str  # as the user wrote it
  platform: str  # 'cuda' or 'tpu'
  generation: str  # 'sm_86', 'v5e', ...
  devices: int
  hosts: int
  gpu: Gpu | None = None
  tpu: TpuChip | None = None
  topology: str = ""  # TPU: '2x4', '4x4x4'

  @property
  def device_memory(self) -> int:
    """Bytes of memory per device."""
    return self.gpu.memory if self.gpu else self.tpu.hbm

  def usable_memory(self) -> int:
    """Bytes a program may use per device: JAX's preallocated share on a GPU, HBM less
    libtpu's reserve on a TPU."""
    if self.gpu:
      return int(self.device_memory * gpu_memory_fraction())
    return int(self.device_memory * (1 - TPU_HBM_RESERVE))

  @property
  def peak_flops(self) -> float:
    """Peak bf16 FLOP/s of one device."""
    return self.gpu.peak_flops if self.gpu else self.tpu.peak_flops

  @property
  def memory_bandwidth(self) -> float:
    """HBM (or GDDR) bytes/s of one device."""
    return self.gpu.bandwidth if self.gpu else self.tpu.bandwidth

  @property
  def link_bandwidth(self) -> float:
    """Bytes/s one device sends in a collective: half the ICI's two-way figure on a TPU; NVLink
    or PCIe within a GPU host, the InfiniBand share of a GPU across hosts."""
    if self.tpu:
      return self.tpu.ici / 2
    if self.hosts > 1:
      return min(self.gpu.link, INTER_HOST.get(self.generation, INTER_HOST_DEFAULT))
    return self.gpu.link

  @property
  def kind(self) -> str:
    """The device kind a running device of this target reports."""
    return self.gpu.kind if self.gpu else self.tpu.kinds[0]

  def describe(self) -> str:
    """One line: what the target is."""
    if self.gpu:
      hosts = f"{self.hosts} hosts x " if self.hosts > 1 else ""
      return (f"{hosts}{self.devices // self.hosts} x {self.gpu.kind} ({self.generation}, "
              f"{self.device_memory / GiB:.0f} GiB)")
    return (f"TPU {self.generation} {self.topology}: {self.devices} chips on {self.hosts} "
            f"host{'s' if self.hosts > 1 else ''}, {self.device_memory / GiB:.0f} GiB HBM each")


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX gives XLA: $XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75."""
  text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  if not text:
    return DEFAULT_GPU_MEMORY_FRACTION
  try:
    fraction = float(text)
  except ValueError as e:
    raise errors.TargetError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r}: not a number") from e
  if not 0 < fraction <= 1:
    raise errors.TargetError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r}: must be in (0, 1]")
  return fraction


def _count(text: str, name: str) -> tuple[int, int]:
  """(hosts, devices per host) of a GPU count suffix: '8' or '2x8'."""
  m = re.fullmatch(r"(?:(\d+)x)?(\d+)", text)
  if not m or int(m.group(2)) < 1 or (m.group(1) is not None and int(m.group(1)) < 1):
    raise errors.TargetError(f"target {name!r}: the count after ':' is DEVICES or HOSTSxDEVICES "
                             "(e.g. h100_sxm:8, a100_80gb:2x8)")
  return int(m.group(1) or 1), int(m.group(2))


def tpu_topology(chips: int, dims: int) -> str:
  """The standard topology of a slice of `chips` chips ('2x4', '2x2x1', '4x4x4')."""
  if chips < 1 or chips & (chips - 1) or (dims == 3 and chips < 4):
    raise errors.TargetError(f"{chips} chips: a {dims}D slice has a power of two"
                             + (", at least 4" if dims == 3 else ""))
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:  # double the smallest axis, the last one on ties
    smallest = min(shape)
    shape[max(i for i, n in enumerate(shape) if n == smallest)] *= 2
  if dims == 3 and chips > 4:
    shape.sort()
  return "x".join(map(str, shape))


def _tpu_target(name: str, generation: str, count: int) -> Target:
  chip = TPUS[generation]
  if count % chip.cores_per_chip_in_name:
    raise errors.TargetError(f"target {name!r}: {generation} names count TensorCores, "
                             f"{chip.cores_per_chip_in_name} per chip: use an even number")
  chips = count // chip.cores_per_chip_in_name
  try:
    topology = tpu_topology(chips, chip.dims)
  except ValueError as e:
    raise errors.TargetError(f"target {name!r}: {e}") from e
  hosts = 1 if chips <= SINGLE_HOST_CHIPS[chip.dims] else chips // math.prod(HOST_BOUNDS)
  return Target(name, "tpu", generation, chips, hosts, tpu=chip, topology=topology)


def parse(name: str) -> Target:
  """The target `name` stands for; raises errors.TargetError naming the known ones."""
  name = name.strip()
  m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name)
  if m:
    if m.group(1) not in TPUS:
      raise errors.TargetError(f"target {name!r}: unknown TPU generation {m.group(1)!r}; known: "
                               f"{', '.join(TPUS)}")
    return _tpu_target(name, m.group(1), int(m.group(2)))
  model, _, count = name.partition(":")
  if model not in GPUS:
    raise errors.TargetError(f"unknown target {name!r}: known GPUs {', '.join(GPUS)} (with :N or "
                             f":HOSTSxN for several), TPU slices such as {', '.join(NAMED_SLICES)}")
  hosts, per_host = _count(count, name) if count else (1, 1)
  gpu = GPUS[model]
  return Target(name, "cuda", gpu.generation, hosts * per_host, hosts, gpu=gpu)


def parse_list(text: str) -> list[Target]:
  """Comma-separated target names, each parsed."""
  names = [n for n in (x.strip() for x in text.split(",")) if n]
  if not names:
    raise errors.TargetError("no target named (see --list-targets)")
  return [parse(n) for n in names]


def gpu_target_config(gpu: Gpu) -> str:
  """`gpu` as an XLA stream_executor.GpuTargetConfigProto in text form (what XLA compiles for
  when there is no GPU)."""
  g = GPU_GENERATIONS[gpu.generation]
  fields = [
    ("threads_per_block_limit", 1024), ("threads_per_warp", 32),
    ("shared_memory_per_block", 49_152), ("shared_memory_per_core", g.shared_per_sm),
    ("threads_per_core_limit", g.threads_per_sm), ("core_count", gpu.sms),
    ("fpus_per_core", 64 if gpu.generation == "sm_80" else 128),
    ("block_dim_limit_x", 2_147_483_647), ("block_dim_limit_y", 65_535),
    ("block_dim_limit_z", 65_535), ("memory_bandwidth", int(gpu.bandwidth)),
    ("l2_cache_size", gpu.l2), ("clock_rate_ghz", gpu.clock_ghz),
    ("device_memory_size", gpu.memory), ("shared_memory_per_block_optin", g.shared_per_block),
    ("registers_per_core_limit", gpu.registers_per_sm), ("registers_per_block_limit", 65_536),
    ("thread_dim_limit_x", 1024), ("thread_dim_limit_y", 1024), ("thread_dim_limit_z", 64),
  ]
  extension = "ACCELERATED_FEATURES" if g.accelerated else "NONE"
  lines = [f"  {k}: {v}" for k, v in fields] + [
    f"  cuda_compute_capability {{ major: {g.major} minor: {g.minor} "
    f"feature_extension: {extension} }}", f'  name: "{gpu.kind}"']
  return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n" + 'platform_name: "CUDA"\n'
          "dnn_version_info { major: 9 minor: 8 patch: 0 }\n"
          f'device_description_str: "{gpu.kind}"\n')


def gpu_generation(compute_capability: str | None) -> str:
  """The GPU generation ('sm_86') of a CUDA compute capability ('8.6', as a jax.Device reports
  it); 'sm_80' when the runtime does not say."""
  text = "8.0" if compute_capability is None else str(compute_capability)
  major, minor = (int(x) for x in text.split(".")[:2])
  return f"sm_{major}{minor}"


def known_gpu_generation(generation: str) -> str | None:
  """The generation of GPU_GENERATIONS that `generation` ('sm_87') is or behaves as ('sm_80');
  None for one the table does not know."""
  generation = GPU_GENERATION_ALIASES.get(generation, generation)
  return generation if generation in GPU_GENERATIONS else None


def gpu_of_generation(generation: str) -> str:
  """A GPU (a GPUS name) of `generation`: the first the table lists. Shared memory per block and
  instructions are the generation's, the same on each of its GPUs."""
  return next(name for name, gpu in GPUS.items() if gpu.generation == generation)


def shared_memory_limit(generation: str) -> int:
  """Bytes of shared memory one block may use on GPU `generation` ('sm_90')."""
  return GPU_GENERATIONS[generation].shared_per_block


def tpu_generation(device_kind: str) -> str | None:
  """The TPU generation ('v5e') a device kind ('TPU v5 lite') stands for; None if unknown."""
  for name, chip in TPUS.items():
    if device_kind in chip.kinds:
      return name
  return None


def peak_flops(device_kind: str) -> tuple[float, str] | None:
  """(peak bf16 FLOP/s, where the number comes from) of a device kind, or None if unknown.

  The longest match wins: 'NVIDIA H100 PCIe' is an H100 PCIe, not an H100 SXM.
  """
  kind = device_kind.lower()
  for chip_name, chip in TPUS.items():
    if kind in (k.lower() for k in chip.kinds):
      return chip.peak_flops, f"TPU {chip_name} bf16 datasheet peak"
  matches = [gpu for gpu in GPUS.values() if gpu.match.lower() in kind]
  if not matches:
    return None
  gpu = max(matches, key=lambda g: len(g.match))
  return gpu.peak_flops, f"{gpu.match} bf16 dense datasheet peak"


def for_devices(device_kind: str, count: int) -> Target | None:
  """The target a running set of `count` devices of `device_kind` is (its peaks, bandwidths),
  on one host; None for a kind the tables do not know."""
  kind = device_kind.lower()
  for name, chip in TPUS.items():
    if kind in (k.lower() for k in chip.kinds):
      return Target(device_kind, "tpu", name, count, 1, tpu=chip)
  matches = [(name, gpu) for name, gpu in GPUS.items() if gpu.match.lower() in kind]
  if not matches:
    return None
  name, gpu = max(matches, key=lambda m: len(m[1].match))
  return Target(f"{name}:{count}", "cuda", gpu.generation, count, 1, gpu=gpu)


def listing() -> list[dict[str, Any]]:
  """Every named GPU and TPU slice, as rows for --list-targets."""
  rows = []
  for name in [*GPUS, *NAMED_SLICES]:
    t = parse(name)
    rows.append({"target": name, "platform": t.platform, "generation": t.generation,
                 "devices": t.devices, "hosts": t.hosts, "kind": t.kind,
                 "device_memory": t.device_memory, "usable_memory": t.usable_memory(),
                 "peak_flops": t.peak_flops, "topology": t.topology or None})
  return rows

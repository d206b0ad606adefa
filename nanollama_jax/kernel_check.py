"""Compile the Pallas attention kernels with XLA's GPU compiler for every GPU generation, no GPU.

Per table entry (generation x dtype x head dim) causal attention over packed documents and its
gradients are compiled for one GPU of that generation described to XLA, not present
(`aot.devices`): XLA's own Triton and ptxas build the forward, dq and dk/dv kernels, and a
kernel whose block needs more shared memory than the GPU allows fails the compile
(RESOURCE_EXHAUSTED). From XLA's dump of the compile we read each kernel's shared memory (its
thunk sequence) and its PTX, which the ptxas XLA uses compiles once more for registers and
spills. A failed entry is compiled again once per kernel, the other two on the smallest tiles,
to say which kernel does not fit. Needs the `aot` extra (the CUDA plugin and nvcc), and
JAX_PLATFORMS=cpu set before JAX starts.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

# JAX has no public name for the CUDA directory whose ptxas XLA runs.
from jax._src import lib as jax_lib

from nanollama_jax import aot, targets
from nanollama_jax.attention import pallas

KERNELS = ("fwd", "dq", "dkv")
DTYPES = ("bfloat16", "float32")
SEQ_LEN = 200  # not a multiple of any block: the padded path, as training's packed sequences
# XLA optimises these compiles fully whatever XLA_FLAGS say (the tests' level 0 changes the
# kernels' registers, not their shared memory).
_OPTIONS = {"xla_backend_optimization_level": 3}
_THUNK = re.compile(r"flash_attention_(\w+) grid: .* shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"\.entry flash_attention_(\w+)\(")


@dataclasses.dataclass(frozen=True)
class Kernel:
  """What XLA built for one kernel of an entry, or why it could not."""
  kernel: str  # fwd, dq or dkv
  blocks: pallas.Blocks
  shared: int | None = None  # bytes per block, from XLA's thunk sequence
  registers: int | None = None  # per thread (ptxas on XLA's PTX; None without ptxas)
  spill_stores: int | None = None  # bytes per thread
  spill_loads: int | None = None
  traps: bool = False  # the PTX holds a trap: Triton gave up on the kernel
  error: str | None = None  # XLA's refusal of this kernel alone (only for a failed entry)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One table entry compiled by XLA for one GPU of its generation."""
  generation: str
  gpu: str  # the targets.GPUS name compiled for
  dtype: str
  head_dim: int
  tiles: pallas.Tiles
  limit: int  # bytes of shared memory a block may use on this generation
  compile_s: float  # lowering and XLA's compile of the program
  kernels: tuple[Kernel, ...]
  error: str | None = None  # XLA's refusal of the whole program, on one line

  @property
  def ok(self) -> bool:
    """XLA compiled the program and no kernel traps."""
    return self.error is None and not any(k.traps for k in self.kernels)

  def to_dict(self) -> dict[str, Any]:
    """The entry as JSON-ready values, its verdict included."""
    return dict(dataclasses.asdict(self), ok=self.ok)


def lower_attention(dtype: str, head_dim: int, generation: str, backward: bool = True,
                    tiles: pallas.Tiles | None = None,
                    device: jax.Device | None = None) -> jax.stages.Lowered:
  """Causal attention over packed documents (and its gradients) lowered for CUDA, no GPU needed.

  Two query heads share one K/V head; the inputs are abstract, placed on `device` (a
  compile-only device from aot.devices) when given. `tiles` overrides the table's.
  """
  placed = {} if device is None else {"sharding": jax.sharding.SingleDeviceSharding(device)}
  q = jax.ShapeDtypeStruct((1, SEQ_LEN, 2, head_dim), jnp.dtype(dtype), **placed)
  kv = jax.ShapeDtypeStruct((1, SEQ_LEN, 1, head_dim), jnp.dtype(dtype), **placed)
  seg = jax.ShapeDtypeStruct((1, SEQ_LEN), jnp.int32, **placed)

  def attend(q, k, v, seg):
    return pallas.pallas_attention(q, k, v, seg, True, blocks=tiles, generation=generation)

  def grads(q, k, v, seg):
    return jax.grad(lambda *qkv: attend(*qkv, seg).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))(q, k, v)

  return jax.jit(grads if backward else attend).trace(q, kv, kv, seg).lower(
    lowering_platforms=("cuda",))


@functools.cache
def _ptxas() -> str | None:
  """The ptxas XLA compiles with (the CUDA directory JAX gives it), else one on the PATH."""
  path = os.path.join(getattr(jax_lib, "cuda_path", None) or "", "bin", "ptxas")
  return path if os.path.isfile(path) else shutil.which("ptxas")


def _ptxas_numbers(ptx_path: str) -> tuple[int | None, int | None, int | None]:
  """Registers, spill stores and spill loads (bytes per thread) of one kernel's PTX."""
  ptxas = _ptxas()
  with open(ptx_path) as f:
    arch = re.search(r"^\.target (\w+)", f.read(), re.M)
  if not (ptxas and arch):
    return None, None, None
  log = subprocess.run([ptxas, "-v", f"-arch={arch.group(1)}", "-o", os.devnull, ptx_path],
                       capture_output=True, text=True, check=True).stderr
  registers = re.search(r"Used (\d+) registers", log)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  if not (registers and spills):
    return None, None, None
  return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _read_dump(dump: str, tiles: pallas.Tiles) -> dict[str, Kernel]:
  """Each attention kernel of a compile XLA dumped into `dump`, by kernel (fwd, dq, dkv)."""
  shared = {}
  for path in glob.glob(os.path.join(dump, "*.thunk_sequence.txt")):
    with open(path) as f:
      shared.update((k, int(n)) for k, n in _THUNK.findall(f.read()))
  found = {}
  for path in glob.glob(os.path.join(dump, "*.ptx")):
    with open(path) as f:
      text = f.read()
    for kernel in _ENTRY.findall(text):
      found[kernel] = Kernel(kernel, getattr(tiles, kernel), shared.get(kernel),
                             *_ptxas_numbers(path), traps="trap;" in text)
  return found


def _compile(lowered: jax.stages.Lowered, tiles: pallas.Tiles) -> dict[str, Kernel]:
  """XLA's build of `lowered`, by kernel; raises XLA's error when it refuses."""
  with tempfile.TemporaryDirectory(prefix="nanollama-kernel-check-") as dump:
    lowered.compile(compiler_options=dict(_OPTIONS, xla_dump_to=dump))
    return _read_dump(dump, tiles)


def _alone(kernel: str, dtype: str, head_dim: int, generation: str, tiles: pallas.Tiles,
           device: jax.Device) -> Kernel:
  """One kernel of a refused entry compiled with the other two on the smallest tiles."""
  small = pallas.fallback_tiles(dtype, head_dim)
  mixed = dataclasses.replace(small, **{kernel: getattr(tiles, kernel)})
  try:
    built = _compile(lower_attention(dtype, head_dim, generation, tiles=mixed, device=device),
                     mixed)
  except jax.errors.JaxRuntimeError as e:
    return Kernel(kernel, getattr(tiles, kernel), error=aot.one_line(e))
  return built[kernel]


def check_entry(generation: str, dtype: str, head_dim: int,
                tiles: pallas.Tiles | None = None) -> Entry:
  """One entry (its table tiles, or `tiles`) compiled by XLA for a GPU of `generation`."""
  gpu = targets.gpu_of_generation(generation)
  device = aot.devices(targets.parse(gpu))[0]
  tiles = tiles or pallas.choose_tiles(head_dim, dtype, False, generation)
  about = (generation, gpu, dtype, head_dim, tiles, targets.shared_memory_limit(generation))
  start = time.perf_counter()
  lowered = lower_attention(dtype, head_dim, generation, tiles=tiles, device=device)
  try:
    built = _compile(lowered, tiles)
  except jax.errors.JaxRuntimeError as e:
    took = time.perf_counter() - start
    kernels = tuple(_alone(k, dtype, head_dim, generation, tiles, device) for k in KERNELS)
    return Entry(*about, took, kernels, error=aot.one_line(e))
  return Entry(*about, time.perf_counter() - start, tuple(built[k] for k in KERNELS))


def check(generations: Iterable[str] = pallas.GENERATIONS,
          head_dims: Iterable[int] = pallas.HEAD_DIMS, dtypes: Iterable[str] = DTYPES,
          progress: Callable[[int, int, Entry], None] | None = None) -> list[Entry]:
  """Every entry (generation x dtype x head dim) compiled by XLA; raises errors.InstallError
  without the CUDA plugin. `progress(done, total, entry)` hears of each entry compiled."""
  todo = [(g, d, h) for g in generations for d in dtypes for h in head_dims]
  entries = []
  for about in todo:
    entries.append(check_entry(*about))
    if progress:
      progress(len(entries), len(todo), entries[-1])
  return entries


def _size(n: int | None) -> str:
  """Bytes with thousands separators, '-' when unknown."""
  return "-" if n is None else f"{n:,}"


def _row(entry: Entry, k: Kernel) -> tuple[str, ...]:
  """One kernel of an entry as the cells of format_table's row."""
  b = k.blocks
  spills = "-" if k.spill_stores is None else f"{k.spill_stores}/{k.spill_loads}"
  verdict = "yes" if k.error is None and not k.traps else ("NO (trap)" if k.traps else "NO")
  share = f"{k.shared / entry.limit:.0%}" if k.shared is not None else "-"
  return (entry.generation, entry.gpu, entry.dtype, str(entry.head_dim), k.kernel,
          f"{b.block_q}x{b.block_k} w{b.num_warps} s{b.num_stages}", _size(k.shared),
          _size(entry.limit), share, _size(k.registers), spills, f"{entry.compile_s:.1f}", verdict)


def format_table(entries: Iterable[Entry]) -> str:
  """The entries as an aligned text table, one line per kernel, then XLA's refusals."""
  entries = list(entries)
  header = ("generation", "gpu", "dtype", "head dim", "kernel", "tiles", "shared", "limit",
            "share", "registers", "spills st/ld", "seconds", "compiles")
  rows = [header] + [_row(e, k) for e in entries for k in e.kernels]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  for e in (e for e in entries if e.error):
    lines.append(f"{e.generation} {e.dtype} head dim {e.head_dim}: {e.error}")
    lines += [f"  {k.kernel}: {k.error}" for k in e.kernels if k.error]
  return "\n".join(lines)

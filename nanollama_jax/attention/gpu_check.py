"""Compile the Pallas attention kernels for named GPUs on any host, to check their tiles fit.

The kernels are lowered for CUDA with a GPU generation named (`pallas_attention(...,
generation=...)`); each Pallas kernel in that program is a custom call whose backend config
carries its Triton module (MLIR bytecode), its warps and its stages. The `triton` package
(`pip install -e ".[gpu-check]"`) compiles that module to cubin for the generation and reports
the shared memory a block needs (and on sm_100 the tensor memory its accumulators take); ptxas's
log gives registers and spills. That is pip Triton, not the Triton inside XLA: its numbers are
close estimates, so an entry must leave HEADROOM of the shared memory spare.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

# JAX has no public API for the Triton module inside a lowered Pallas kernel.
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect

from nanollama_jax.attention import pallas

KERNELS = ("fwd", "dq", "dkv")
DTYPES = ("bfloat16", "float32")
HEADROOM = 0.10  # the share of a block's shared memory an entry leaves unused
SEQ_LEN = 200  # not a multiple of any block: the padded path, as training's packed sequences
# Tensor memory of an sm_100 SM: 128 lanes x 512 columns of 32 bits (PTX ISA, "Tensor Memory").
# Triton replaces a kernel whose accumulators need more columns with a trap.
TENSOR_MEMORY_COLUMNS = 512
_TRITON_CALL = "__gpu$xla.gpu.triton"
# How newer jaxlibs refuse to lower a Pallas Triton kernel for CUDA without the CUDA plugin.
NO_TRITON_HANDLER = "does not have a Triton compilation handler"


@dataclasses.dataclass(frozen=True)
class TritonModule:
  """One Pallas kernel of a program lowered for CUDA."""
  name: str  # the kernel's name: flash_attention_fwd, flash_attention_dq, flash_attention_dkv
  ir: str  # its Triton module as MLIR text
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one compiled kernel needs per block (and per thread)."""
  shared: int  # bytes of shared memory
  tensor_memory: int  # columns of tensor memory (sm_100); 0 elsewhere
  registers: int  # per thread
  spill_stores: int  # bytes per thread
  spill_loads: int  # bytes per thread
  traps: bool  # the compiled kernel holds a trap instruction: Triton gave up on it


@dataclasses.dataclass(frozen=True)
class Entry:
  """One compiled table entry: which kernel, its tiles, what it needs, what its GPU allows."""
  kernel: str
  dtype: str
  head_dim: int
  generation: str
  blocks: pallas.Blocks
  resources: Resources
  limit: int  # bytes of shared memory a block may use on this generation

  @property
  def fits(self) -> bool:
    """Shared memory under the limit with HEADROOM to spare, tensor memory too, no trap."""
    r = self.resources
    return (r.shared <= (1 - HEADROOM) * self.limit and
            r.tensor_memory <= TENSOR_MEMORY_COLUMNS and not r.traps)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), fits=self.fits)


def lower_attention(dtype: str, head_dim: int, generation: str, backward: bool = True,
                    tiles: pallas.Tiles | None = None) -> jax.stages.Lowered:
  """Causal attention over packed documents (and its gradients) lowered for CUDA, no GPU needed.

  Two query heads share one K/V head; the inputs are abstract, so nothing is allocated or run.
  `tiles` overrides the table's.
  """
  q = jax.ShapeDtypeStruct((1, SEQ_LEN, 2, head_dim), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((1, SEQ_LEN, 1, head_dim), jnp.dtype(dtype))
  seg = jax.ShapeDtypeStruct((1, SEQ_LEN), jnp.int32)

  def attend(q, k, v, seg):
    return pallas.pallas_attention(q, k, v, seg, True, blocks=tiles, generation=generation)

  def grads(q, k, v, seg):
    return jax.grad(lambda *qkv: attend(*qkv, seg).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))(q, k, v)

  try:
    return jax.jit(grads if backward else attend).trace(q, kv, kv, seg).lower(
      lowering_platforms=("cuda",))
  except RuntimeError as e:
    if NO_TRITON_HANDLER not in str(e):
      raise
    raise RuntimeError(f"{e}: this jaxlib compiles Triton modules while lowering for CUDA, which "
                       "needs its CUDA plugin (pip install -e '.[cuda]'); jaxlib 0.10.2 lowers "
                       "them on any host") from e


def triton_calls(lowered: jax.stages.Lowered) -> list[ir.Operation]:
  """The Triton custom calls of a program lowered for CUDA, in program order."""
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          if (child.operation.name == "stablehlo.custom_call" and
              ir.StringAttr(child.attributes["call_target_name"]).value == _TRITON_CALL):
            calls.append(child.operation)
          walk(child.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  return calls


def capture(lowered: jax.stages.Lowered) -> list[TritonModule]:
  """The Triton module, warps and stages of every Pallas kernel in a program lowered for CUDA."""
  modules = []
  for call in triton_calls(lowered):
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    context = mlir.JaxIrContext()
    context.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
      text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
    modules.append(TritonModule(ir.StringAttr(config["name"]).value, text,
                                ir.IntegerAttr(config["num_warps"]).value,
                                ir.IntegerAttr(config["num_stages"]).value))
  return modules


def _triton():
  try:
    import triton  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('compiling the kernels needs the triton package: pip install -e '
                      '".[gpu-check]"') from e
  return triton


def _ptxas_numbers(log: str) -> tuple[int, int, int]:
  """Registers, spill stores and spill loads (bytes) from a `ptxas -v` log."""
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  registers = re.search(r"Used (\d+) registers", log)
  if not (spills and registers):
    raise ValueError(f"no register or spill counts in the ptxas log:\n{log}")
  return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _keep_ptxas_log(*args):
  """A Triton stages hook: the cubin stage keeps ptxas's log in the kernel's metadata.

  Triton deletes the log unless told to print it; kept in the metadata, it is cached with the
  cubin, so a cached kernel still reports its registers and spills.
  """
  if not args:  # triton.compile asks for a key that sets these kernels apart in its cache
    return "nanollama-ptxas-log", "1"
  _, stages, *_ = args
  make_cubin = stages["cubin"]

  def cubin(src, metadata):
    triton = _triton()
    out = io.StringIO()
    previous = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
      with contextlib.redirect_stdout(out):
        binary = make_cubin(src, metadata)
    finally:
      triton.knobs.nvidia.dump_ptxas_log = previous
    metadata["ptxas_log"] = out.getvalue()
    return binary

  stages["cubin"] = cubin


def compile_module(module: TritonModule, generation: str) -> Resources:
  """What `module` needs, compiled to cubin for GPU `generation` ("sm_90")."""
  triton = _triton()
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  arch = int(generation.removeprefix("sm_"))
  previous = triton.knobs.runtime.add_stages_inspection_hook
  triton.knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
  try:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, f"{module.name}.ttir")
      with open(path, "w") as f:
        f.write(module.ir)
      kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=dict(
        num_warps=module.num_warps, num_stages=module.num_stages, enable_fp_fusion=True))
  finally:
    triton.knobs.runtime.add_stages_inspection_hook = previous
  return Resources(kernel.metadata.shared, getattr(kernel.metadata, "tmem_size", 0),
                   *_ptxas_numbers(kernel.metadata.ptxas_log), traps="trap;" in kernel.asm["ptx"])


def check(generations: Iterable[str] = pallas.GENERATIONS,
          head_dims: Iterable[int] = pallas.HEAD_DIMS, dtypes: Iterable[str] = DTYPES,
          progress: Callable[[int, int, str], None] | None = None, jobs: int = 1) -> list[Entry]:
  """Every table entry (kernel x dtype x head dim x generation) compiled to cubin.

  The kernels are lowered in this process and compiled by `jobs` processes;
  `progress(done, total, what)` hears of each kernel compiled.
  """
  _triton()
  configs = [(g, d, h) for g in generations for d in dtypes for h in head_dims]

  def lowered():  # ((kernel, dtype, head dim, generation, blocks), Triton module), lazily
    for generation, dtype, head_dim in configs:
      tiles = pallas.choose_tiles(head_dim, dtype, False, generation)
      modules = capture(lower_attention(dtype, head_dim, generation))
      for kernel, module in zip(KERNELS, modules, strict=True):
        yield (kernel, dtype, head_dim, generation, getattr(tiles, kernel)), module

  return [Entry(*about, resources, pallas.SHARED_MEMORY_LIMITS[about[3]])
          for about, resources in _compile_all(lowered(), len(KERNELS) * len(configs), jobs,
                                               progress)]


def _compile_all(todo, total, jobs, progress):
  """(about, what compile_module found) for each (about, module) of `todo`, in `jobs` processes."""
  def report(done, about):
    if progress:
      kernel, dtype, head_dim, generation, _ = about
      progress(done, total, f"{kernel} {dtype} head dim {head_dim} {generation}")

  if jobs <= 1:
    results = []
    for about, module in todo:
      results.append((about, compile_module(module, about[3])))
      report(len(results), about)
    return results
  spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs JAX's threads
  with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
    futures = {pool.submit(compile_module, module, about[3]): about for about, module in todo}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      report(done, futures[future])
    return [(about, future.result()) for future, about in futures.items()]


def format_table(entries: Iterable[Entry]) -> str:
  """The entries as an aligned text table, one line each."""
  header = ("kernel", "dtype", "head dim", "generation", "tiles", "shared", "limit", "tmem",
            "registers", "spills st/ld", "fits")
  rows = [header] + [
    (e.kernel, e.dtype, str(e.head_dim), e.generation,
     f"{e.blocks.block_q}x{e.blocks.block_k} w{e.blocks.num_warps} s{e.blocks.num_stages}",
     f"{e.resources.shared:,}", f"{e.limit:,}", str(e.resources.tensor_memory or "-"),
     str(e.resources.registers), f"{e.resources.spill_stores}/{e.resources.spill_loads}",
     "yes" if e.fits else ("NO (trap)" if e.resources.traps else "NO"))
    for e in entries]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                   for row in rows)

"""Compile a recipe's programs for a named GPU or TPU on a host without one, and judge the fit.

XLA's GPU compiler and libtpu both compile for devices that are described, not present
(`jax.experimental.topologies`): a GPU from its target config (`targets.gpu_target_config`),
a TPU slice from its topology. `.compile()` then runs the real pipeline, Pallas kernels through
XLA's own Triton and ptxas, splash through Mosaic, and `memory_analysis()` is the compiler's
own account of each device's memory. Needs the `aot` extra (the CUDA plugin with nvcc, and
libtpu), and JAX_PLATFORMS=cpu set before JAX starts (the CUDA plugin's start-up check fails
without a GPU otherwise); scripts/aot_compile.py does both.

Per program (train_step, eval_step, prefill, decode) and device:
  arguments   bytes of its inputs (train state and batch; parameters and tokens for the others)
  temporaries XLA's scratch for the program
  outputs     bytes of outputs that do not reuse a donated input
  resident    what the loop keeps on the device beside the program (eval and sampling run
              with the optimizer state still resident)
  total       their sum; `fits` when it is at most what the device lets a program use
              (targets.Target.usable_memory)
Without a GPU, XLA's autotuner cannot time GEMM configurations and takes its defaults: the
temporaries of a real GPU's compile can differ a little.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nanollama_jax import attention, errors, evaluate, metrics, model, roofline, sharding, targets
from nanollama_jax import step as step_lib

PROGRAMS = ("train_step", "eval_step", "prefill", "decode")
# Custom calls that are attention kernels, by platform: our Pallas kernel through XLA's Triton
# on a GPU, splash (Mosaic) on a TPU.
_KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
MAX_BATCH_LIMIT = 4096  # --max-batch looks no further than this many sequences per device


@dataclasses.dataclass
class Program:
  """One compiled program of a target, per device."""
  program: str
  ok: bool
  error: str | None = None
  argument_bytes: int = 0
  temp_bytes: int = 0
  output_bytes: int = 0  # not aliased to a donated input
  resident_bytes: int = 0
  total_bytes: int = 0
  share: float = 0.0  # of the usable memory
  fits: bool = False
  compile_s: float = 0.0
  kernels: int = 0  # attention kernel custom calls in the compiled program
  # The roofline (roofline.py), per device and run of the program. FLOPs are the model's
  # (modelled: metrics.model_flops_per_token, with the recompute of the remat policy); bytes and
  # collectives are read off the compiled program's HLO, loops times their trip counts.
  flops: float = 0.0
  bytes_accessed: float = 0.0
  collective_bytes: float = 0.0
  hlo_flops: float | None = None  # the contractions counted in the compiled HLO, loops included
  compiler_flops: float | None = None  # libtpu's cost_analysis(): a loop's body counted once
  tokens: int = 0  # per run, all devices: what the program processes
  compute_s: float = 0.0  # at the device's peak bf16 FLOP/s
  memory_s: float = 0.0  # at its memory bandwidth
  collective_s: float = 0.0  # at its interconnect's
  step_s: float = 0.0  # the lower bound: max of the three
  limit: str = ""  # which of the three bounds it: compute, memory, collectives
  tokens_per_s: float = 0.0  # at most, all devices
  mfu_ceiling: float | None = None  # train and eval steps: model FLOPs over peak x step_s


@dataclasses.dataclass
class Report:
  """Every program of a recipe on one target."""
  target: str
  description: str
  platform: str
  generation: str
  devices: int
  hosts: int
  device_memory: int
  usable_memory: int
  mesh: dict[str, int]
  batch_per_device: float
  attention: str
  programs: list[Program]
  error: str | None = None  # the recipe could not be built for this target at all

  @property
  def fits(self) -> bool:
    return self.error is None and all(p.ok and p.fits for p in self.programs)

  @property
  def bytes_per_device(self) -> int:
    return max((p.total_bytes for p in self.programs), default=0)

  @property
  def compile_s(self) -> float:
    return sum(p.compile_s for p in self.programs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(fits=self.fits, bytes_per_device=self.bytes_per_device,
             share=self.bytes_per_device / self.usable_memory, compile_s=self.compile_s)
    return d


def one_line(error: BaseException) -> str:
  """An exception's message on one line, the compiler's verdict first, at most 400 characters."""
  text = " ".join(str(error).split())
  m = re.search(r"(RESOURCE_EXHAUSTED|INVALID_ARGUMENT|INTERNAL|UNIMPLEMENTED|FAILED_PRECONDITION)"
                r":.*", text)
  text = m.group(0) if m else f"{type(error).__name__}: {text}"
  return text if len(text) <= 400 else text[:397] + "..."


@functools.cache
def devices(target: targets.Target) -> tuple[Any, ...]:
  """Compile-only devices of `target` (no hardware needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  errors.require((errors.AOT_PLUGINS[target.platform],), "aot", f"compiling for {target.name}")
  # A compile-only executable cannot be loaded back from JAX's persistent compilation cache
  # (there is no device client to load it into): caching one only costs a write and a warning.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    if target.platform == "cuda":
      per_host = target.devices // target.hosts
      topology = topologies.get_topology_desc(
        platform="cuda", target_config=targets.gpu_target_config(target.gpu),
        topology=f"1x{target.hosts}x{per_host}")
    else:
      # libtpu lets one process per host load it (a lock file in /tmp) to guard the TPU; a
      # compile-only load guards nothing, and a second compile beside a first must not fail.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      shape = [int(n) for n in target.topology.split("x")]
      bounds = (targets.HOST_BOUNDS if target.hosts > 1 else
                tuple(shape) + (1,) * (3 - len(shape)))
      topology = topologies.get_topology_desc(
        topology_name=f"{target.tpu.topology_prefix}:{target.topology}", platform="tpu",
        chip_config_name=target.tpu.chip_config, chips_per_host_bounds=bounds, num_slices=1,
        wrap=(False, False, False))
  except (RuntimeError, ValueError, KeyError) as e:
    need = "the CUDA plugin and nvcc" if target.platform == "cuda" else "libtpu"
    raise errors.InstallError(
      f"cannot describe {target.name} to a compiler ({one_line(e)}): compiling for "
      f"{target.platform} needs {need}: {errors.install_command('aot')}; and JAX_PLATFORMS=cpu "
      "set before JAX starts") from e
  found = tuple(topology.devices)
  if len(found) != target.devices:
    raise RuntimeError(f"{target.name}: the compiler describes {len(found)} devices, "
                       f"the table {target.devices}")
  return found


def _lower_eval(cfg, mesh, attn_target, abstract, shardings):
  step = evaluate.make_eval_step(model.graph(cfg.model, attn_target), mesh)
  params = sharding.abstract(abstract.params, shardings.params)
  return step.trace(params, step_lib.abstract_batch(cfg, mesh)).lower(
    lowering_platforms=(attn_target.platform,))


def sampling_shape(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(rows, prompt tokens) the sampling programs are built for: one row per sample prompt of
  the run, padded to a multiple of the devices the rows are split over (as generate.py pads
  them), each a long prompt of half the context (as scripts/generate.py may be given; the
  trainer's own samples are shorter), the cache holding the whole context."""
  prompts = [p for p in cfg.train.sample_prompts.split("|") if p.strip()]
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-max(1, len(prompts)) // split) * split, max(1, cfg.model.max_seq_len // 2)


def _lower_sampling(cfg, mesh, attn_target, abstract, shardings, tokens: int):
  """The cached forward of `tokens` new tokens per row as generate.py runs it: a prefill of an
  empty cache through the attention kernels, or a decode step at 1 token. Rows, tokens and the
  cache are split like a training batch and the model (the parameters as in training); only
  the last position's logits are computed."""
  rows, _ = sampling_shape(cfg, mesh)
  prefill = tokens > 1
  graphdef = model.graph(cfg.model, attn_target)
  ids = jax.ShapeDtypeStruct((rows, tokens), jnp.int32, sharding=jax.sharding.NamedSharding(
    mesh, sharding.logical_to_spec(("batch", "length"), (rows, tokens), mesh)))

  cache = jax.eval_shape(lambda: model.init_cache(
    cfg.model, jnp.ones((rows, cfg.model.max_seq_len), bool)))
  cache = jax.tree.map(
    lambda axes, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(axes, x.shape, mesh))),
    model.cache_axes(cache), cache, is_leaf=lambda x: isinstance(x, tuple))

  def forward(params, tokens_BxT, positions_BxT, cache):
    return model.apply_with_cache(graphdef, params, tokens_BxT, positions_BxT, cache, prefill)

  step = jax.jit(sharding.under_mesh(forward, mesh), donate_argnums=3)
  return step.trace(sharding.abstract(abstract.params, shardings.params), ids, ids,
                    cache).lower(lowering_platforms=(attn_target.platform,))


def _compiler_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend estimates cost
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compile(name: str, lower: Callable[[], Any], platform: str, resident: int,
             usable: int, devices: int) -> tuple[Program, roofline.Costs | None]:
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # any compiler failure is a verdict
    return Program(name, ok=False, error=one_line(e), compile_s=time.perf_counter() - start), None
  took = time.perf_counter() - start
  m = compiled.memory_analysis()
  outputs = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
  total = m.argument_size_in_bytes + m.temp_size_in_bytes + outputs + resident
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except  # some backends keep no text
    text = None
  # The attention kernels' custom calls, and the costs the roofline reads, from one text.
  kernels = text.count(f'custom_call_target="{_KERNEL_CALLS[platform]}"') if text else 0
  costs = roofline.hlo_costs(text, devices) if text else None
  return Program(name, ok=True, argument_bytes=m.argument_size_in_bytes,
                 temp_bytes=m.temp_size_in_bytes, output_bytes=outputs, resident_bytes=resident,
                 total_bytes=total, share=total / usable, fits=total <= usable, compile_s=took,
                 kernels=kernels,
                 compiler_flops=_compiler_flops(compiled)), costs


def program_flops(model_cfg: ml_collections.ConfigDict, program: str, remat: str,
                  tokens: int, context: int, rows: int) -> tuple[float, float]:
  """(FLOPs the hardware does, FLOPs of the model's useful work) in one run of `program`, all
  devices: metrics.model_flops_per_token's terms, forward only outside training; the train
  step adds the forward its remat policy recomputes (full: every layer, attention included;
  save_attn: the layers' matmuls); sampling computes the logits of the last position only."""
  L, D, V = model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size
  layers = 2 * L * model.layer_matmul_param_count(model_cfg)  # forward, per token
  attention = metrics.attention_flops_per_token(model_cfg, context) / 3  # forward, per token
  if program == "train_step":
    useful = metrics.model_flops_per_token(model_cfg, context) * tokens
    recompute = {"full": layers + attention, "save_attn": layers}.get(remat, 0.0) * tokens
    return useful + recompute, useful
  if program == "eval_step":
    useful = metrics.model_flops_per_token(model_cfg, context) / 3 * tokens
    return useful, useful
  if program == "decode":  # every cached position is attended (the cache is masked, not cut)
    attention = metrics.attention_flops_per_token(model_cfg, 2 * context - 1) / 3
  total = (layers + attention) * tokens + 2 * D * V * rows
  return total, total


def program_tokens(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, program: str,
                   prompt: int) -> tuple[int, int, int]:
  """(tokens one run of `program` processes, all devices; the context their attention covers;
  rows) for the roofline."""
  T = cfg.data.seq_len
  if program == "train_step":
    return cfg.data.batch_size * T, T, cfg.data.batch_size
  if program == "eval_step":
    rows = step_lib.abstract_batch(cfg, mesh)["inputs"].shape[0]
    return rows * T, T, rows
  rows, _ = sampling_shape(cfg, mesh)
  if program == "prefill":
    return rows * prompt, prompt, rows
  return rows, cfg.model.max_seq_len, rows


def fill_roofline(p: Program, costs: roofline.Costs | None, cfg: ml_collections.ConfigDict,
              target: targets.Target, tokens: int, context: int, rows: int) -> None:
  """Fills `p`'s roofline fields: modelled FLOPs, and the compiled program's bytes."""
  if not p.ok:
    return
  total, useful = program_flops(cfg.model, p.program, cfg.model.remat, tokens, context, rows)
  p.flops, p.tokens = total / target.devices, tokens
  if costs is not None:
    p.bytes_accessed, p.collective_bytes = costs.bytes, costs.collective_bytes
    p.hlo_flops = costs.flops
  b = roofline.Bound(p.flops / target.peak_flops, p.bytes_accessed / target.memory_bandwidth,
                     p.collective_bytes / target.link_bandwidth)
  p.compute_s, p.memory_s, p.collective_s = b.compute_s, b.memory_s, b.collective_s
  p.step_s, p.limit = b.step_s, b.limit
  p.tokens_per_s = tokens / b.step_s if b.step_s else 0.0
  if p.program in ("train_step", "eval_step") and b.step_s:
    p.mfu_ceiling = useful / (b.step_s * target.peak_flops * target.devices)


def compile_target(cfg: ml_collections.ConfigDict, target: targets.Target,
                   programs: tuple[str, ...] = PROGRAMS,
                   progress: Callable[[str], None] | None = None, prompt: int = 0) -> Report:
  """Compiles `programs` of `cfg` for `target`; a program that fails is reported, not raised.
  `prompt`: the prefill's prompt tokens (default: sampling_shape's, half the context)."""
  found = devices(target)
  attn_target = attention.Platform(target.platform, target.generation)
  impl = attention.resolve(cfg.model.attention, attn_target)
  shape = sharding.mesh_shape(cfg.mesh, len(found))
  split = shape["data"] * shape["fsdp"]
  report = Report(target.name, target.describe(), target.platform, target.generation,
                  target.devices, target.hosts, target.device_memory, target.usable_memory(),
                  shape, cfg.data.batch_size / cfg.optim.grad_accum / split, impl, [])
  mesh = sharding.make_mesh(cfg.mesh, found)
  try:
    sharding.check_batch(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
  except errors.ConfigError as e:
    report.error = f"{e} ({target.devices} devices on {target.name})"
    return report
  built = step_lib.build(cfg, mesh, attn_target)
  abstract, shardings = built.abstract, built.shardings
  # Beside evaluation and sampling the loop keeps the rest of the train state on the device.
  beside = (sharding.bytes_per_device(shardings, abstract)
            - sharding.bytes_per_device(shardings.params, abstract.params))
  prompt = prompt or sampling_shape(cfg, mesh)[1]
  lowerers = {
    "train_step": (lambda: built.lower(cfg, mesh, attn_target.platform), 0),
    "eval_step": (lambda: _lower_eval(cfg, mesh, attn_target, abstract, shardings), beside),
    "prefill": (lambda: _lower_sampling(cfg, mesh, attn_target, abstract, shardings, prompt),
                beside),
    "decode": (lambda: _lower_sampling(cfg, mesh, attn_target, abstract, shardings, 1), beside),
  }
  for name in programs:
    if progress:
      progress(f"{target.name}: compiling {name}")
    lower, resident = lowerers[name]
    program, costs = _compile(name, lower, target.platform, resident, report.usable_memory,
                              target.devices)
    fill_roofline(program, costs, cfg, target, *program_tokens(cfg, mesh, name, prompt))
    report.programs.append(program)
  return report


def with_micro_batch(cfg: ml_collections.ConfigDict, per_device: int,
                     target: targets.Target) -> ml_collections.ConfigDict:
  """`cfg` with `per_device` sequences per device in each micro-batch (grad_accum kept)."""
  shape = sharding.mesh_shape(cfg.mesh, target.devices)
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.data.batch_size = per_device * shape["data"] * shape["fsdp"] * cfg.optim.grad_accum
  return out


def max_batch(cfg: ml_collections.ConfigDict, target: targets.Target,
              progress: Callable[[str], None] | None = None) -> tuple[int, Report | None]:
  """The largest per-device micro-batch whose train step fits `target`, found by compiling
  (doubling, then bisection); 0 when not even one sequence fits. Also that size's report."""
  def fits(n: int) -> Report | None:
    if progress:
      progress(f"{target.name}: trying {n} sequences per device")
    report = compile_target(with_micro_batch(cfg, n, target), target, ("train_step",))
    return report if report.fits else None

  best, best_report = 0, None
  low, high = 0, None  # low fits (0 trivially), high does not
  n = 1
  while high is None and n <= MAX_BATCH_LIMIT:
    found = fits(n)
    if found:
      best, best_report, low = n, found, n
      n *= 2
    else:
      high = n
  if high is None:
    return best, best_report
  return _bisect(fits, low, high, best_report)


def _bisect(fits: Callable[[int], Any], low: int, high: int, found: Any = None) -> tuple[int, Any]:
  """The largest n in [low, high) for which `fits(n)` is truthy, and what it returned there,
  given that `low` fits (`found` is its result) and `high` does not: by bisection."""
  while high - low > 1:
    mid = (low + high) // 2
    result = fits(mid)
    if result:
      low, found = mid, result
    else:
      high = mid
  return low, found


@dataclasses.dataclass(frozen=True)
class Sizing:
  """One way to run a recipe's global batch on a target: the mesh and the micro-batch."""
  data: int
  fsdp: int
  tensor: int
  per_device: int  # sequences per device per micro-batch
  grad_accum: int

  def describe(self) -> str:
    return (f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}, {self.per_device} per "
            f"device x {self.grad_accum} micro-batch{'es' if self.grad_accum > 1 else ''}")


def sizings(cfg: ml_collections.ConfigDict, devices: int) -> list[Sizing]:
  """Every mesh (data x fsdp x tensor, powers of two; tensor at most 8 and dividing the heads)
  and micro-batch that keep `cfg`'s global batch (data.batch_size sequences per step) on
  `devices` devices, the largest micro-batches first."""
  batch, heads = cfg.data.batch_size, cfg.model.n_heads
  out = []
  tensor = 1
  while tensor <= min(8, devices):
    if devices % tensor == 0 and heads % tensor == 0:
      data = 1
      while data <= devices // tensor:
        fsdp = devices // tensor // data
        if (devices // tensor) % data == 0 and batch % (data * fsdp) == 0:
          rows = batch // (data * fsdp)
          out += [Sizing(data, fsdp, tensor, rows // accum, accum)
                  for accum in _powers_of_two_dividing(rows)]
        data *= 2
    tensor *= 2
  return out


def _powers_of_two_dividing(n: int) -> list[int]:
  out, k = [], 1
  while k <= n and n % k == 0:
    out.append(k)
    k *= 2
  return out


def with_sizing(cfg: ml_collections.ConfigDict, sizing: Sizing) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.mesh.data, out.mesh.fsdp, out.mesh.tensor = sizing.data, sizing.fsdp, sizing.tensor
  out.optim.grad_accum = sizing.grad_accum
  return out


def sweep(cfg: ml_collections.ConfigDict, target: targets.Target,
          progress: Callable[[str], None] | None = None) -> list[tuple[Sizing, Program]]:
  """Per mesh that keeps the global batch, the largest micro-batch whose train step fits
  `target` (halving from the whole batch per device), compiled; ranked by the roofline's step
  time. Meshes where none fits are left out."""
  found: list[tuple[Sizing, Program]] = []
  by_mesh: dict[tuple[int, int, int], list[Sizing]] = {}
  for s in sizings(cfg, target.devices):
    by_mesh.setdefault((s.data, s.fsdp, s.tensor), []).append(s)
  for options in by_mesh.values():
    for s in options:
      if progress:
        progress(f"{target.name}: sweep: {s.describe()}")
      report = compile_target(with_sizing(cfg, s), target, ("train_step",))
      if report.fits:
        found.append((s, report.programs[0]))
        break
  return sorted(found, key=lambda x: x[1].step_s)


PROMPT_STEP = 128  # --max-prompt looks at multiples of this (the kernels' padded lengths)


def max_prompt(cfg: ml_collections.ConfigDict, target: targets.Target,
               progress: Callable[[str], None] | None = None) -> int:
  """The longest prompt (a multiple of PROMPT_STEP, at most the context) whose prefill fits
  `target` beside the resident train state, found by compiling (bisection); 0 when none does."""
  def fits(n: int) -> bool:
    if progress:
      progress(f"{target.name}: trying a prefill of {n} tokens")
    return compile_target(cfg, target, ("prefill",), prompt=n).fits

  top = cfg.model.max_seq_len // PROMPT_STEP
  if top == 0:
    return cfg.model.max_seq_len if fits(cfg.model.max_seq_len) else 0
  if fits(top * PROMPT_STEP):
    return top * PROMPT_STEP
  # In steps of PROMPT_STEP: 0 fits trivially, `top` does not.
  return _bisect(lambda steps: fits(steps * PROMPT_STEP), 0, top)[0] * PROMPT_STEP


def _table(rows: list[tuple[str, ...]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g}"


def _roofline_lines(report: Report) -> list[str]:
  """The programs' roofline as a table, and where its numbers come from."""
  ok = [p for p in report.programs if p.ok]
  if not ok:
    return []
  rows = [("roofline", "TFLOP", "GB moved", "GB sent", "compute ms", "memory ms",
           "collect. ms", "bound ms", "limit", "tokens/s", "MFU ceiling")]
  for p in ok:
    rows.append((p.program, f"{p.flops / 1e12:.3g}", f"{p.bytes_accessed / 1e9:.3g}",
                 f"{p.collective_bytes / 1e9:.3g}", _ms(p.compute_s), _ms(p.memory_s),
                 _ms(p.collective_s), _ms(p.step_s), p.limit, f"{p.tokens_per_s:,.0f}",
                 "-" if p.mfu_ceiling is None else f"{p.mfu_ceiling:.0%}"))
  t = targets.parse(report.target)
  return _table(rows) + [
    f"  per device and run: FLOPs modelled (the model's, remat recompute included), bytes "
    f"moved and sent compiled (the program's HLO, loops counted); at {t.peak_flops / 1e12:.0f} "
    f"TFLOP/s, {t.memory_bandwidth / 1e9:,.0f} GB/s of memory, {t.link_bandwidth / 1e9:,.0f} "
    f"GB/s sent: the step takes at least `bound ms`"]


def format_sweep(target: targets.Target, ranked: list[tuple[Sizing, Program]]) -> str:
  """The sizings that fit `target`, fastest first by the roofline."""
  if not ranked:
    return f"{target.name}: no sizing of this global batch fits"
  rows = [("rank", "mesh and micro-batch", "GiB", "bound ms", "limit", "tokens/s",
           "per device", "MFU ceiling")]
  for i, (s, p) in enumerate(ranked, 1):
    rows.append((str(i), s.describe(), gib(p.total_bytes), _ms(p.step_s), p.limit,
                 f"{p.tokens_per_s:,.0f}", f"{p.tokens_per_s / target.devices:,.0f}",
                 "-" if p.mfu_ceiling is None else f"{p.mfu_ceiling:.0%}"))
  return "\n".join([f"{target.name}: sizings that fit, by the train step's roofline",
                    *_table(rows)])


def gib(n: float) -> str:
  return f"{n / targets.GiB:.2f}"


def format_report(report: Report) -> str:
  """A target's programs as an aligned text table with its verdict."""
  head = (f"{report.target}: {report.description}; mesh data={report.mesh['data']} "
          f"fsdp={report.mesh['fsdp']} tensor={report.mesh['tensor']}, "
          f"{report.batch_per_device:g} sequences per device per micro-batch, "
          f"attention {report.attention}")
  if report.error:
    return f"{head}\n  does not run here: {report.error}"
  header = ("program", "arguments", "temporaries", "outputs", "resident", "total GiB", "of usable",
            "kernels", "compile s", "fits")
  rows = [header]
  for p in report.programs:
    if not p.ok:
      rows.append((p.program, "-", "-", "-", "-", "-", "-", "-", f"{p.compile_s:.1f}",
                   "FAILED"))
      continue
    rows.append((p.program, gib(p.argument_bytes), gib(p.temp_bytes), gib(p.output_bytes),
                 gib(p.resident_bytes), gib(p.total_bytes), f"{p.share:.0%}", str(p.kernels),
                 f"{p.compile_s:.1f}", "yes" if p.fits else "NO"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines += [f"  {p.program} failed to compile: {p.error}" for p in report.programs if not p.ok]
  lines += _roofline_lines(report)
  verdict = "fits" if report.fits else "DOES NOT FIT"
  lines.append(f"  {verdict}: {gib(report.bytes_per_device)} of {gib(report.usable_memory)} GiB "
               f"usable per device ({gib(report.device_memory)} GiB on the device)")
  return "\n".join([head, *lines])

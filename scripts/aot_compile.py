"""Compile a recipe for named GPUs and TPUs on this host, no accelerator needed, and say what fits.

  python scripts/aot_compile.py --config configs/tinystories.py --targets rtx3090,h100_sxm,v5e-8
      [--config.data.batch_size=256 ...] [--json] [--max-batch] [--max-prompt] [--sweep]
      [--programs train_step,...]
  python scripts/aot_compile.py --list-targets

For each target it compiles the recipe's train step (with its grad_accum, remat, chunked loss
and attention), the eval step and the sampling programs (prefill, one decode step) on the
target's mesh (the recipe's mesh rules over the target's devices), with XLA's GPU compiler or
libtpu, and prints per device: arguments, temporaries, outputs, what stays resident beside the
program, the total against the memory a program may use there, the attention kernels in the
compiled program, and compile seconds; then each program's roofline: its FLOPs (the model's),
the bytes it moves through memory and sends to other devices (read off the compiled program),
the time each takes at the target's peaks, the lower bound on the step time they give, the
tokens/s it allows and the MFU ceiling (docs/performance.md). --sweep ranks the meshes and
micro-batches that keep the recipe's global batch by the train step's bound, compiling each
(the largest micro-batch that fits per mesh). --max-batch also finds the largest per-device
micro-batch whose train step fits, and --max-prompt the longest prompt (a multiple of 128
tokens, up to the context) whose prefill fits beside the train state, by compiling. The
sampling programs are built for the recipe's sample prompts (train.sample_prompts), as many
rows as that padded to the devices the rows are split over, each half the context long.

Targets: GPUs by name (rtx3090, h100_sxm, ...; NAME:8 for 8 on one host, NAME:2x8 for 2 hosts
of 8), TPU slices by their Cloud names (v5e-8, v5p-128, ...); --list-targets shows them.
A GPU program may use XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the device's memory,
what JAX preallocates; the rest is the CUDA context's, cuBLAS's and NCCL's.

Needs the aot extra: pip install -e ".[aot]". Exit status: 0 when every program of every
target compiled and fits, 1 when one does not fit or fails to compile (XLA's message in one
line), 2 for a mistake in the command (an unknown target, a bad config) or a missing extra.
"""

from __future__ import annotations

import os

# Before JAX starts: the CUDA plugin's start-up check fails on a host without a GPU, which
# would leave the compile-only CUDA topology unregistered. Without TPU_WORKER_HOSTNAMES libtpu
# logs an error about the workers of a TPU VM this host is not; its one remaining warning
# ("could not determine TPU accelerator type") is noise here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import argparse
import dataclasses
import json
import sys

from nanollama_jax import aot, errors, recipe, targets
from nanollama_jax import config as config_lib


def _list_targets() -> str:
  lines = [f"{'target':10}  {'devices':>7}  {'hosts':>5}  {'memory GiB':>10}  "
           f"{'usable GiB':>10}  {'peak TFLOP/s':>12}  device"]
  for row in targets.listing():
    lines.append(f"{row['target']:10}  {row['devices']:>7}  {row['hosts']:>5}  "
                 f"{row['device_memory'] / targets.GiB:>10.1f}  "
                 f"{row['usable_memory'] / targets.GiB:>10.1f}  {row['peak_flops'] / 1e12:>12.0f}  "
                 f"{row['kind']} ({row['generation']}{', ' + row['topology'] if row['topology'] else ''})")
  return "\n".join(lines + ["GPUs take :N or :HOSTSxN (h100_sxm:8, a100_80gb:2x8); any TPU slice "
                            "with a standard topology is accepted (v5p-256, v6e-64)"])


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", help="a recipe (configs/*.py); override fields with "
                                  "--config.group.key=value")
  p.add_argument("--targets", help="comma-separated target names (see --list-targets)")
  p.add_argument("--programs", default=",".join(aot.PROGRAMS),
                 help=f"comma-separated, of {','.join(aot.PROGRAMS)} (default: all)")
  p.add_argument("--max-batch", action="store_true",
                 help="also find the largest per-device micro-batch that fits each target")
  p.add_argument("--max-prompt", action="store_true",
                 help="also find the longest prompt whose prefill fits each target")
  p.add_argument("--sweep", action="store_true",
                 help="also rank the meshes and micro-batches that keep the global batch by the "
                      "train step's roofline (compiling each)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
  p.add_argument("--list-targets", action="store_true", help="print the known targets and exit")
  return p.parse_known_args(argv)


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
  args, overrides = _parse(argv)
  if args.list_targets:
    print(json.dumps({"targets": targets.listing()}) if args.json else _list_targets())
    return
  if not args.config or not args.targets:
    raise errors.UsageError("both --config and --targets are required (see --help)")
  programs = tuple(p for p in args.programs.split(",") if p)
  unknown = [p for p in programs if p not in aot.PROGRAMS]
  if unknown or not programs:
    raise errors.UsageError(f"--programs {args.programs}: allowed {', '.join(aot.PROGRAMS)}")
  chosen = targets.parse_list(args.targets)
  targets.gpu_memory_fraction()  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION fails now
  cfg = recipe.load(args.config, overrides)
  config_lib.validate(cfg, check_files=False)
  results = []
  for target in chosen:
    report = aot.compile_target(cfg, target, programs, progress=_say)
    result = report.to_dict()
    if args.max_batch:
      best, _ = aot.max_batch(cfg, target, progress=_say)
      result["max_batch_per_device"] = best
    if args.max_prompt:
      result["max_prompt_tokens"] = aot.max_prompt(cfg, target, progress=_say)
    ranked = aot.sweep(cfg, target, progress=_say) if args.sweep else None
    if ranked is not None:
      result["sweep"] = [{"sizing": dataclasses.asdict(s), "train_step": dataclasses.asdict(p)}
                         for s, p in ranked]
    results.append(result)
    if not args.json:
      print(aot.format_report(report))
      if args.max_batch:
        print(f"  largest micro-batch whose train step fits: {result['max_batch_per_device']} "
              "sequences per device")
      if args.max_prompt:
        print(f"  longest prompt whose prefill fits: {result['max_prompt_tokens']} tokens (of "
              f"a {cfg.model.max_seq_len}-token context)")
      if ranked is not None:
        print(aot.format_sweep(target, ranked))
  if args.json:
    print(json.dumps({"config": args.config, "overrides": overrides, "results": results}))
  sys.exit(0 if all(r["fits"] for r in results) else 1)


if __name__ == "__main__":
  errors.cli(main)

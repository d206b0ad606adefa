"""Compile every Pallas attention tile-table entry with XLA's GPU compiler; no GPU needed.

  python scripts/check_gpu_kernels.py [--json] [--generations sm_80,sm_90] [--head-dims 64,128]
                                      [--dtypes bfloat16,float32]

For each generation x dtype x head dim it compiles causal attention over packed documents and
its gradients (the forward, dq and dk/dv kernels) for one GPU of that generation, described to
XLA rather than present, and prints per kernel the tiles, the shared memory a block needs
(XLA's own account) against what the GPU allows, registers and spills (ptxas on XLA's PTX), and
the seconds each entry took. An entry XLA refuses is compiled once more per kernel to name the
kernel. Exit status: 0 when every entry compiled, 1 when one did not (XLA's message in one
line), 2 for a mistake in the command or without the CUDA plugin (pip install -e ".[aot]").
"""

from __future__ import annotations

import os

# Before JAX starts: the CUDA plugin's start-up check fails on a host without a GPU, which would
# leave the compile-only CUDA topology unregistered.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import time

from nanollama_jax import errors, kernel_check
from nanollama_jax.attention import pallas


def _csv(allowed, cast=str):
  def parse(text: str):
    values = [cast(x) for x in text.split(",") if x]
    unknown = [v for v in values if v not in allowed]
    if unknown:
      raise argparse.ArgumentTypeError(
        f"{', '.join(map(str, unknown))}: allowed {', '.join(map(str, allowed))}")
    return values
  return parse


def _progress(done: int, total: int, entry: kernel_check.Entry) -> None:
  verdict = "compiled" if entry.ok else "REFUSED"
  print(f"[{done}/{total}] {entry.generation} ({entry.gpu}) {entry.dtype} head dim "
        f"{entry.head_dim}: {verdict} in {entry.compile_s:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--generations", type=_csv(pallas.GENERATIONS), default=list(pallas.GENERATIONS),
                 help=f"comma-separated (default: all of {','.join(pallas.GENERATIONS)})")
  p.add_argument("--head-dims", type=_csv(pallas.HEAD_DIMS, int), default=list(pallas.HEAD_DIMS),
                 help=f"comma-separated (default: all of {','.join(map(str, pallas.HEAD_DIMS))})")
  p.add_argument("--dtypes", type=_csv(kernel_check.DTYPES), default=list(kernel_check.DTYPES),
                 help=f"comma-separated (default: all of {','.join(kernel_check.DTYPES)})")
  args = p.parse_args(argv)
  start = time.perf_counter()
  entries = kernel_check.check(args.generations, args.head_dims, args.dtypes, _progress)
  took = time.perf_counter() - start
  failed = [e for e in entries if not e.ok]
  if args.json:
    print(json.dumps(dict(entries=[e.to_dict() for e in entries], failed=len(failed),
                          total_s=took)))
  else:
    print(kernel_check.format_table(entries))
    print(f"{len(entries) - len(failed)} of {len(entries)} entries compiled in {took:.1f} s")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  errors.cli(main)

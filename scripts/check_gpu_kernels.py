"""Compile every Pallas attention kernel for named GPUs and check that its tiles fit; no GPU needed.

  python scripts/check_gpu_kernels.py [--json] [--generations sm_80,sm_90] [--head-dims 64,128]
                                      [--dtypes bfloat16,float32] [--jobs N]

For each kernel (forward, dq, dk/dv) x dtype x head dim x generation it prints the tiles, the
shared memory a block needs against what the GPU allows, registers and ptxas's spills. It exits
with status 1 when an entry leaves less than the headroom spare. The numbers come from the
`triton` package (pip install -e ".[gpu-check]"), compiling on the CPU: close estimates of what
XLA's own Triton builds, not measurements on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

from nanollama_jax.attention import gpu_check, pallas


def _csv(allowed, cast=str):
  def parse(text: str):
    values = [cast(x) for x in text.split(",") if x]
    unknown = [v for v in values if v not in allowed]
    if unknown:
      raise argparse.ArgumentTypeError(
        f"{', '.join(map(str, unknown))}: allowed {', '.join(map(str, allowed))}")
    return values
  return parse


def _progress(done: int, total: int, what: str) -> None:
  print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--generations", type=_csv(pallas.GENERATIONS), default=list(pallas.GENERATIONS),
                 help=f"comma-separated (default: all of {','.join(pallas.GENERATIONS)})")
  p.add_argument("--head-dims", type=_csv(pallas.HEAD_DIMS, int), default=list(pallas.HEAD_DIMS),
                 help=f"comma-separated (default: all of {','.join(map(str, pallas.HEAD_DIMS))})")
  p.add_argument("--dtypes", type=_csv(gpu_check.DTYPES), default=list(gpu_check.DTYPES),
                 help=f"comma-separated (default: all of {','.join(gpu_check.DTYPES)})")
  p.add_argument("--jobs", type=int, default=1,
                 help="processes compiling kernels (default 1; the CPU's cores speed it up)")
  args = p.parse_args(argv)
  try:
    entries = gpu_check.check(args.generations, args.head_dims, args.dtypes, _progress, args.jobs)
  except (ImportError, RuntimeError) as e:
    sys.exit(f"error: {e}")
  failed = [e for e in entries if not e.fits]
  if args.json:
    print(json.dumps(dict(headroom=gpu_check.HEADROOM, entries=[e.to_dict() for e in entries],
                          failed=len(failed))))
  else:
    print(gpu_check.format_table(entries))
    print(f"{len(entries) - len(failed)} of {len(entries)} kernels fit with "
          f"{gpu_check.HEADROOM:.0%} of shared memory to spare")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()

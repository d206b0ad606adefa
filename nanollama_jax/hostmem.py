"""Host memory: keep freed memory in the process, so XLA:CPU stops page-faulting every step.

XLA's CPU runtime allocates each execution's scratch space (hundreds of MB for a train step) on
a worker thread and frees it when the step ends. glibc serves a block that large with a fresh
`mmap` and gives it back to the kernel on `free`, so every step faults its whole scratch space
in again, page by page, zeroed by the kernel: for the benchmark's CPU step (docs/performance.md)
that was 133,000 minor faults and about 0.3 s of kernel time per 0.9 s step.

`keep_freed_memory` sets glibc's allocator to serve every thread from the main heap (one arena),
never to use `mmap` for large blocks, and never to trim the heap, so freed scratch blocks are
reused by later steps. Now and then over the first tens of steps the heap grows until it holds
enough of them (a step's block can still be in use when the next step allocates, and aligned
blocks fragment); then host memory stays flat. The process keeps a few scratch sizes of host
memory until it exits, which a training process would hold anyway. It must run before JAX starts its CPU backend: threads that already hold an arena
keep it.

One arena serializes the allocations of every thread, so a native library that allocates from
many threads at once slows down: the `tokenizers` library's batch encoding (a tokenizer.json
read in the training process, data.num_workers=0) ran at 0.22-0.24M tokens/s on 2 cores with
its thread per core, 0.49M with one thread (scripts/benchmark.py --sections data).
`keep_freed_memory` therefore sets TOKENIZERS_PARALLELISM=false unless it is set already; grain's
worker processes start with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # an int: mallopt takes one

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc as above; returns whether it applied (False off Linux/glibc).

  Idempotent. It does nothing where there is no glibc (macOS, musl), and changes nothing on an
  accelerator's memory: only host allocations are affected.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # mallopt returns 1 on success and 0 on error.
  _applied = all(mallopt(param, value) == 1 for param, value in (
    (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  if _applied:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  return _applied


def applied() -> bool:
  """Whether `keep_freed_memory` has changed malloc's settings in this process."""
  return bool(_applied)

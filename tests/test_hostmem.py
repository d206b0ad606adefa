"""hostmem.keep_freed_memory: XLA:CPU's per-call scratch space stops being page-faulted in."""

import json
import os
import subprocess
import sys

import pytest

# A jitted call whose 128 MB intermediate (tanh of the input, read by a dot and a max) is scratch
# space: allocated on a runtime thread and freed each call. Prints the minor faults of each call.
_PROBE = """
import json, resource, sys
from nanollama_jax import hostmem
applied = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
def f(a, w):
  b = jnp.tanh(a)
  return jnp.sum(b @ w) + jnp.sum(jnp.max(b, axis=1))
f = jax.jit(f)
a, w = jnp.ones((8192, 4096)), jnp.ones((4096, 8))
f(a, w).block_until_ready()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.slow
def test_scratch_space_is_reused_instead_of_faulted_in():
  default, keep = probe("default"), probe("keep")
  assert keep["applied"] is True
  # 128 MB is 32,768 pages of 4 KiB: the default allocator faults them all in on every call.
  assert min(default["faults"]) > 30_000
  # Kept, the heap grows now and then until it holds enough scratch blocks (a block can still
  # be in use when the next call allocates, and aligned blocks fragment); when that happens
  # varies from run to run (within the first 40 calls here, then host memory stays flat), but
  # most calls reuse a block and fault nothing.
  faulting = sum(f > 1_000 for f in keep["faults"])
  assert faulting <= len(keep["faults"]) // 2, keep["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_one_arena_turns_the_tokenizers_threads_off_unless_asked_for():
  code = ("import os; from nanollama_jax import hostmem; "
          "print(hostmem.keep_freed_memory(), os.environ.get('TOKENIZERS_PARALLELISM'))")
  env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}

  def run(env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env).stdout.split()
  assert run(env) == ["True", "false"]
  assert run({**env, "TOKENIZERS_PARALLELISM": "true"}) == ["True", "true"]

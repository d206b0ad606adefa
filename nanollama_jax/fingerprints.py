"""Fingerprints of a checkpoint's arrays: per-leaf hashes that do not depend on the sharding.

A checkpoint records them at save time; a restore that reads back other values is damaged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """A uint32 hash of the bits of `x`: sum over elements of bits * (2 * flat_index + 1).

  Integer sums wrap and are exact in any order, so the value does not depend on how `x` is
  sharded; the odd multiplier means that changing any one element changes the hash.
  """
  if x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:
    raise TypeError(f"no fingerprint for {x.dtype}")
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride = (stride * x.shape[axis]) % (1 << 32)
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> tuple[list[jax.Array], jax.Array]:
  leaves = jax.tree.leaves(tree)
  finite = jnp.array(True)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(x))
  return [_leaf_fingerprint(x) for x in leaves], finite


def fingerprint(tree: Any) -> tuple[dict[str, int], bool]:
  """Per-leaf uint32 hashes of a tree of arrays, keyed by path, and whether all are finite."""
  hashes, finite = jax.device_get(_fingerprints(tree))
  keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return {k: int(h) for k, h in zip(keys, hashes)}, bool(finite)


def mismatched(tree: Any, expected: dict[str, int]) -> list[str]:
  """The paths of `tree` whose fingerprint differs from the one recorded at save time."""
  hashes, _ = fingerprint(tree)
  return [p for p, h in hashes.items() if expected.get(p) != h]

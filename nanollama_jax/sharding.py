"""Meshes, logical-axis rules and multi-host start-up: the only module that knows about devices.

Parameters and activations name their dimensions with logical axes (`model.logical_axes`);
`RULES` maps each logical axis onto mesh axes of the mesh (`data`, `fsdp`, `tensor`):

  data    replicas: parameters replicated, the batch split
  fsdp    fully sharded data parallel: the batch split, and parameters and optimizer state split
          along their `embed` dimension (gathered layer by layer inside the step)
  tensor  tensor parallel: attention heads, the MLP hidden dimension and the vocabulary split

A dimension whose size the mesh axis does not divide stays whole (replicated) rather than
failing; `describe` reports which.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanollama_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it is split over (None: never split).
RULES: dict[str, tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),
  "length": None,
  "embed": ("fsdp",),
  "vocab": ("tensor",),
  "heads": ("tensor",),
  "kv_heads": ("tensor",),
  "mlp": ("tensor",),
  "head_dim": None,
  "layers": None,
}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
  """Resolves the config's axis sizes (one may be -1: the devices left) for `n_devices`."""
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}  # checked by config.validate
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise errors.ConfigError(
        f"mesh.{free[0]}=-1: the other axes ({fixed} devices) do not divide the {n_devices} "
        "devices")
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise errors.ConfigError(
      f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
      f"{math.prod(sizes.values())} devices, but there are {n_devices} ({jax.devices()[0].platform}"
      "): make the product match, or set one axis to -1")
  return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (all devices by default)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    # Orders devices so that `tensor` (the most communication) stays within a host / slice.
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec for a value of `shape` whose dimensions have these logical names."""
  spec: list[Any] = []
  used: set[str] = set()
  for name, size in zip(logical, shape):
    axes = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
    chosen = []
    for axis in axes or ():
      if axis in used or mesh.shape[axis] == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
        continue  # does not divide: leave this dimension less split
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def param_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a parameter tree, from its logical axes and shapes."""
  return jax.tree.map(
    lambda logical, x: NamedSharding(mesh, logical_to_spec(tuple(logical), x.shape, mesh)),
    logical_tree, abstract_tree, is_leaf=_is_spec)


def state_shardings(tx, abstract_params: Any, abstract_opt_state: Any, logical_params: Any,
                    mesh: Mesh) -> tuple[Any, Any]:
  """Shardings of the parameters and of the optimizer state (whose moments follow them)."""
  import optax  # pylint: disable=import-outside-toplevel
  params = param_shardings(logical_params, abstract_params, mesh)
  opt = optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt_state, params,
    transform_non_params=lambda _: replicated(mesh),
    is_leaf=lambda x: isinstance(x, NamedSharding))
  return params, opt


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value (scalars, counters)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [batch, length]: rows split over `data` x `fsdp`."""
  return NamedSharding(mesh, P(RULES["batch"], None))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
  split = math.prod(mesh.shape[a] for a in RULES["batch"])
  micro = batch_size // grad_accum
  if micro % split:
    raise errors.ConfigError(
      f"data.batch_size={batch_size} / optim.grad_accum={grad_accum} = {micro} rows per "
      f"micro-batch must be divisible by mesh data x fsdp = {split}")


def data_blocks(batch_sharding: NamedSharding, batch_size: int) -> list[tuple[int, int]]:
  """The rows (start, stop) of the global batch each process holds, by process index."""
  blocks: dict[int, set[tuple[int, int]]] = {}
  for device, index in batch_sharding.devices_indices_map((batch_size,)).items():
    rows = (index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
    blocks.setdefault(device.process_index, set()).add(rows)
  spans = []
  for process in range(len(blocks)):
    held = sorted(blocks[process])
    start, stop = held[0][0], held[-1][1]
    rows = stop - start
    if any(a[1] != b[0] for a, b in zip(held, held[1:])) or batch_size % rows or start % rows:
      raise errors.ConfigError(
        f"the batch rows of process {process}'s devices, {held}, are not one block "
        f"that tiles the batch of {batch_size}: order the mesh's devices by process")
    spans.append((start, stop))
  return spans


def data_shard(batch_sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(index, count) of this process's share of the data: its block of rows of the global batch.

  Processes whose devices hold the same rows (a batch not split over them, e.g. tensor
  parallelism across hosts) get the same index and must read the same data; the others read
  disjoint shares. With one process, (0, 1).
  """
  start, stop = data_blocks(batch_sharding, batch_size)[jax.process_index()]
  rows = stop - start
  return start // rows, batch_size // rows


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's block of rows (`local`) into global arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def process_rows(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, np.ndarray]:
  """This process's rows of a batch that every process holds whole (the evaluation batches)."""
  index, count = data_shard(sharding, len(batch["inputs"]))
  rows = len(batch["inputs"]) // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def under_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
  """`fn` traced with `mesh` as the context, so that activation constraints apply."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings`: one
  Sharding for every leaf, or a tree of them matching `tree`. What restores and ahead-of-time
  lowering take instead of arrays."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical axes when tracing under a mesh; else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def per_shard(fn: Callable, logical_in: Sequence[Sequence[str | None]],
              logical_out: Sequence[str | None]) -> Callable:
  """`fn` run by each device on its block of the arguments (shard_map) when tracing under a
  mesh; else `fn` itself. For custom calls (attention kernels) that XLA cannot partition.

  Dimensions are split by their logical axes; a logical axis is split only as far as the mesh
  divides it in every argument, so dimensions with the same name are split alike.
  """

  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
      return fn(*args)
    sizes: dict[str, int] = {}
    for names, x in zip(logical_in, args):
      for name, size in zip(names, x.shape):
        sizes[name] = math.gcd(sizes.get(name, 0), size)

    def spec(names):
      return logical_to_spec(names, [sizes[n] for n in names], mesh)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(n) for n in logical_in),
                         out_specs=spec(logical_out), check_vma=False)(*args)
  return wrapped


def bytes_per_device(shardings: Any, abstract_tree: Any) -> int:
  """Bytes one device holds of `abstract_tree` placed on `shardings` (its largest shard)."""
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_tree)))


def describe(mesh: Mesh, shardings: Any, abstract_tree: Any) -> str:
  """A one-line summary: the mesh and the bytes of the tree held per device."""
  per_device = bytes_per_device(shardings, abstract_tree)
  sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
  return f"mesh {sizes} over {mesh.devices.size} {jax.devices()[0].platform} devices; " \
         f"state {per_device / 2**20:,.1f} MiB per device"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins this process to a multi-process run before any device is used.

  With an address, the three values name the run (a GPU cluster, or processes on one machine);
  without one, JAX finds them in the environment of a TPU pod slice or a SLURM / Open MPI job.
  On CPUs the processes talk through gloo collectives.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise errors.ConfigError(
        "--coordinator_address needs --num_processes and --process_id as well")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None

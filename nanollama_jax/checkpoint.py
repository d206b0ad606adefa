"""Checkpoints: WORKDIR/checkpoints/<step>/, written by orbax, read back exactly or not at all.

A checkpoint is one orbax step folder with five items, none of them pickled:

  params/     the parameters (orbax PyTree, OCDBT/zarr), restorable onto any mesh
  opt_state/  the optimizer state, likewise
  data/       the train iterator's position: stream_<s>-of-<n>.json, one file per data stream
  meta/       JSON: step, tokens seen, skipped steps, the run's RNG key, and a fingerprint of
              every array (see fingerprints.py)
  config/     JSON: the resolved config of the run that wrote it

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when every item is
complete, so a save killed half-way never looks like a checkpoint. A complete one that was
damaged afterwards (truncated or deleted files) fails to read or fails its fingerprint; `restore`
then moves it to WORKDIR/checkpoints_damaged/ and falls back to the previous one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging as std_logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from nanollama_jax import config as config_lib
from nanollama_jax import errors, fingerprints, model, paths, sharding
from nanollama_jax import workdir as workdir_lib

_TMP_SUFFIX = ".orbax-checkpoint-tmp"

# The items of every checkpoint step folder.
_ITEMS = ("params", "opt_state", "data", "meta", "config")

# Model fields that change the shape of a parameter: a checkpoint cannot be resumed across them.
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "qk_norm",
              "tie_embeddings")


# Reading a checkpoint can fail for reasons that say nothing about its files: the network or the
# object store failed (a retry may work), the device or host ran out of memory (a smaller slice),
# or credentials were refused. Such errors name one of these (tensorstore's and XLA's status
# codes, HTTP codes).
_NETWORK = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection", "connection", "timed out",
            "HTTP response code: 5", "HTTP response code: 429")
_NOT_DAMAGE = _NETWORK + ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory",
                          "PERMISSION_DENIED", "UNAUTHENTICATED", "HTTP response code: 401",
                          "HTTP response code: 403")


def _names(error: BaseException, markers: tuple[str, ...]) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(marker in text for marker in markers)


def is_damage(error: BaseException) -> bool:
  """Whether reading a checkpoint failed because of its files (missing, truncated, altered),
  rather than for a reason outside them (see _NOT_DAMAGE): only then is it set aside."""
  if isinstance(error, (MemoryError, ConnectionError, TimeoutError, PermissionError)):
    return False
  return not _names(error, _NOT_DAMAGE)


# --- Per-process JSON item for the data iterator state ------------------------------------------


class _DataPositionsHandler(ocp.CheckpointHandler):
  """The train iterator's position: one JSON file per data stream, `stream_<s>-of-<n>.json`.

  Each process writes the streams it saves (`ProcessJsonSave.document`, see
  pipeline.Batches.get_state and stream_writers); every process reads them all back, whatever
  the number of processes that wrote them, and keeps those it reads. Checkpoints written before
  data streams existed hold `process_<i>-of-<n>.json`, which are the same states (a process read
  stream i of n), and read as such. The document is captured by the caller at save time (not
  read from a live iterator later), so an asynchronous save cannot record a position the
  iterator reached after the step was saved.
  """

  _PATTERN = re.compile(r"(stream|process)_(\d+)-of-(\d+)\.json")

  def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
    count = args.document["streams"]
    for s, position in args.document["positions"].items():
      (directory / f"stream_{s}-of-{count}.json").write_text(json.dumps(position))

  def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> Any:
    found = {}
    for path in directory.iterdir():
      match = self._PATTERN.fullmatch(path.name)
      if match:
        found[int(match[2])] = (int(match[3]), path)
    counts = {count for count, _ in found.values()}
    if len(counts) != 1 or set(found) != set(range(next(iter(counts)))):
      raise errors.CheckpointError(
        f"{directory} does not hold the position of every data stream (it "
        f"holds {sorted(p.name for _, p in found.values())})")
    return {"streams": counts.pop(),
            "positions": {str(s): json.loads(path.read_text()) for s, (_, path) in found.items()}}

  def metadata(self, directory: epath.Path) -> None:
    return None

  def structure(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass

  @classmethod
  def typestr(cls) -> str:
    # The name checkpoints record for the data item (it was the class's first name).
    return f"{cls.__module__}._ProcessJsonHandler"


@ocp.args.register_with_handler(_DataPositionsHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  document: Any


@ocp.args.register_with_handler(_DataPositionsHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


# --- Config compatibility ----------------------------------------------------------------------


def shape_differences(saved: dict[str, Any], model_cfg: Any) -> list[str]:
  """The shape-determining model fields that differ, as 'key: saved -> now' strings."""
  return [f"model.{k}: {saved.get(k)!r} -> {model_cfg[k]!r}" for k in SHAPE_KEYS
          if saved.get(k) != model_cfg[k]]


def refuse_other_shape(saved: dict[str, Any], model_cfg: Any, where: str,
                        advice: str = "") -> None:
  diff = shape_differences(saved, model_cfg)
  if diff:
    raise errors.CheckpointError(
      f"{where} holds a model of another shape ({'; '.join(diff)}){advice}")


class _DropReadOnlyNotice(std_logging.Filter):
  """Drops orbax's "Given directory is read only" warning, which every read-only manager logs."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads `directory` (relative paths allowed: orbax needs absolute ones)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         cleanup_tmp_directories=False)
  quiet = _DropReadOnlyNotice()
  logging.get_absl_logger().addFilter(quiet)
  try:
    return ocp.CheckpointManager(paths.resolve(directory), options=options, item_names=_ITEMS)
  finally:
    logging.get_absl_logger().removeFilter(quiet)


def _read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _read_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                 where: str) -> Any:
  """Only the parameters of `step`, checked against their fingerprints."""
  try:
    r = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  # tensorstore's and orbax's many errors
    raise errors.CheckpointError(f"{where}: step {step} could not be read, it is damaged: "
                                 f"{type(e).__name__}: {e}") from e
  if fingerprints.mismatched({"params": r["params"]}, r["meta"]["fingerprint"]):
    raise errors.CheckpointError(
      f"{where}: step {step} reads back different values than were saved: "
      "it is damaged")
  return r["params"]


# --- The manager -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Meta:
  """The train state's counters, saved beside its arrays in meta/ (with their fingerprints)."""
  step: int  # batches consumed, skipped ones included
  tokens_seen: int
  bad_run: int = 0  # consecutive non-finite steps up to `step`
  skipped: int = 0  # non-finite steps skipped in the whole run
  rng: tuple[int, int] = (0, 0)  # the run's RNG key data

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "rng": [int(x) for x in self.rng]}

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> Meta:
    """The counters of a saved meta/ item (its fingerprints are read separately)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in saved.items() if k in fields}
    if "rng" in kept:
      kept["rng"] = tuple(int(x) for x in kept["rng"])
    return cls(**kept)


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any | None
  data_state: Any
  meta: Meta
  config: dict[str, Any]


def state_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_workdir(workdir: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails early on an unwritable workdir or a disk too small for one checkpoint (an object
  store's space is not checked)."""
  probe = paths.join(workdir, f".write-probe-{jax.process_index()}-{os.getpid()}")
  try:
    paths.write(probe, "ok")
    paths.remove(probe)
  except OSError as e:
    raise errors.CheckpointError(f"the workdir {workdir} is not writable: {e}") from e
  if paths.is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < checkpoint_bytes:
    raise errors.CheckpointError(
      f"{_size(free)} free under {workdir}, but one checkpoint takes about "
      f"{_size(checkpoint_bytes)}: free some space or use another workdir")
  if free < (keep + 1) * checkpoint_bytes:
    logging.warning("%s free under %s: fewer than train.keep_ckpts + 1 = %d checkpoints of %s fit",
                    _size(free), workdir, keep + 1, _size(checkpoint_bytes))


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or one it came from) is a write that found no space left (ENOSPC)."""
  seen: BaseException | None = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(seen) or "os_error_code='28'" in str(seen):
      return True
    seen = seen.__cause__ or seen.__context__
  return False


def _size(n: int) -> str:
  """Bytes as people read them: GiB from 1 GiB up, else MiB."""
  return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _tree_bytes(directory: str) -> int:
  """The bytes of the files under a local directory."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def finished(step_dir: str) -> bool:
  """Whether orbax finished writing this step folder: on a disk it was renamed from its
  temporary name when complete; in a bucket it is written in place and holds
  commit_success.txt once complete."""
  return ocp.utils.is_checkpoint_finalized(epath.Path(step_dir))


def step_dirs(directory: str) -> list[int]:
  """The finished checkpoint steps in `directory` (a save killed half-way is not one)."""
  return sorted(int(n) for n in paths.listdir(directory)
                if n.isdigit() and finished(paths.join(directory, n)))


class Checkpointer:
  """Saves and restores the training state under `workdir`/checkpoints."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.workdir = paths.resolve(workdir)  # orbax's array writers refuse relative paths
    self.directory = paths.join(self.workdir, workdir_lib.CHECKPOINTS)
    if jax.process_index() == 0:
      # Removed here, before the manager exists: orbax's own clean-up runs in a thread that
      # close() does not wait for, and that fails if a run that could not start removes its
      # workdir meanwhile.
      for name in self._half_written():
        logging.warning("removing %s: a save that did not finish (the run was killed while "
                        "writing it)", paths.join(self.directory, name))
        paths.remove(paths.join(self.directory, name))
    self._manager = self._new_manager(keep, async_save)
    self.last_blocking_s = 0.0
    self._disk_full = False  # a save failed on a full disk, and that was said

  def _new_manager(self, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=False,
      enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, params: Any, opt_state: Any, data_state: Any, meta: Meta,
           config_json: str) -> bool:
    """Starts writing checkpoint `meta.step`; returns False (saving nothing) for a non-finite state.

    Returns once the arrays are copied off the device; with asynchronous saving the files are
    written in the background. `last_blocking_s` holds how long the call blocked.
    """
    start = time.perf_counter()
    step = meta.step
    hashes, finite = fingerprints.fingerprint({"params": params, "opt_state": opt_state})
    if not finite:
      logging.error("not saving step %d: the parameters or optimizer state are not finite", step)
      return False
    try:  # an asynchronous save that failed raises here, at the next save
      self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=ProcessJsonSave(data_state),
        meta=ocp.args.JsonSave({**meta.to_json(), "fingerprint": hashes}),
        config=ocp.args.JsonSave(json.loads(config_json)),
      ), force=True)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore's and orbax's many errors
      self._failed_save(e)
    self.last_blocking_s = time.perf_counter() - start
    return True

  def wait(self) -> None:
    """Blocks until every started save is on disk; raises if one failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed_save(e)

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not self._disk_full:  # said once already
        self._failed_save(e)
    finally:
      if self._disk_full:  # writes of the failed save that were still in flight are done now
        self._remove_half_written()

  def _half_written(self) -> list[str]:
    """The folders of saves that did not finish (orbax's temporary names)."""
    return [n for n in paths.listdir(self.directory) if _TMP_SUFFIX in n]

  def _remove_half_written(self, quiet_s: float = 2.0, limit_s: float = 60.0) -> list[str]:
    """Removes the folders of saves that did not finish; returns their names.

    When one array of a save fails, orbax reports it while the save's other writes go on (and
    the space freed here lets them succeed): they recreate the folder. So the removal repeats
    until nothing has reappeared for `quiet_s` seconds (at most `limit_s`).
    """
    removed: set[str] = set()
    if jax.process_index() != 0:
      return self._half_written()
    deadline, quiet_since = time.monotonic() + limit_s, time.monotonic()
    while time.monotonic() < deadline:
      half = self._half_written()
      for name in half:
        try:
          paths.remove(paths.join(self.directory, name))
        except OSError:  # a write in flight added to it meanwhile: the next pass removes it
          pass
      removed.update(half)
      if half:
        quiet_since = time.monotonic()
      elif time.monotonic() - quiet_since >= quiet_s:
        break
      time.sleep(0.1)
    return sorted(removed)

  def _failed_save(self, error: Exception) -> NoReturn:
    """Raises `error`, or for a disk that filled up during a save, CheckpointError in one line
    that says how much a checkpoint needs, what is free, and which checkpoint the run resumes
    from; the save's half-written folder is removed (nothing complete is touched)."""
    if not is_disk_full(error):
      raise error
    self._disk_full = True
    half = self._remove_half_written()
    failed = sorted({int(n.split(".")[0]) for n in half if n.split(".")[0].isdigit()})
    complete = step_dirs(self.directory)
    need = _tree_bytes(paths.join(self.directory, str(complete[-1]))) if complete else 0
    free = shutil.disk_usage(self.workdir).free
    newest = (f"the newest complete checkpoint is step {complete[-1]}; rerunning the same command "
              "resumes from it" if complete else "no checkpoint is complete yet; rerunning the "
              "same command starts over")
    raise errors.CheckpointError(
      f"the disk of {self.workdir} is full: checkpoint "
      f"{' and '.join(map(str, failed)) or '(the newest)'} could not be written and was removed "
      f"(a checkpoint takes {_size(need)}, {_size(free)} are free); {newest} once "
      "there is room (free some space, or lower train.keep_ckpts)") from None

  def read_config(self, step: int) -> dict[str, Any]:
    return _read_config(self._manager, step)

  def _restore_step(self, step: int, abstract_params: Any, abstract_opt_state: Any | None
                    ) -> Restored:
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore(),
             "config": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      items["data"] = ProcessJsonRestore()
    r = self._manager.restore(step, args=ocp.args.Composite(**items))
    tree = {"params": r["params"]}
    if abstract_opt_state is not None:
      tree["opt_state"] = r["opt_state"]
    bad = fingerprints.mismatched(tree, r["meta"]["fingerprint"])
    if bad:
      raise errors.CheckpointError(f"the values read back differ from the ones saved in {bad[:3]}"
                                   f"{' and others' if len(bad) > 3 else ''}")
    return Restored(step=step, params=r["params"], opt_state=r.get("opt_state"),
                    data_state=r.get("data"), meta=Meta.from_json(r["meta"]),
                    config=r["config"])

  def restore(self, abstract_params: Any, abstract_opt_state: Any | None, model_cfg: Any
              ) -> Restored | None:
    """Restores the newest readable checkpoint onto the given abstract arrays (their shardings),
    whatever the mesh, number of processes or data layout that wrote it.

    A checkpoint whose files are missing or unreadable, or that reads back different values
    than were saved, is damaged: it is moved to WORKDIR/checkpoints_damaged/ and the previous one
    is tried. A read that failed for another reason (out of memory, the network, permissions)
    says nothing about the checkpoint: it is left in place and CheckpointError raised. Returns
    None when there is no checkpoint; raises CheckpointError when there are some but none is
    readable, or when the newest one was written for a model of another shape.
    """
    steps = sorted(self.steps(), reverse=True)
    if not steps:
      return None
    damaged = []
    for step in steps:
      try:
        saved = self.read_config(step)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(self._set_aside(step, e))
        continue
      refuse_other_shape(saved.get("model", {}), model_cfg,
                          paths.join(self.directory, str(step)),
                          ": use a new workdir, or set these back to resume")
      try:
        restored = self._restore_step(step, abstract_params, abstract_opt_state)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(self._set_aside(step, e))
        continue
      if damaged:
        logging.warning("resuming from step %d instead: %d newer checkpoint(s) were damaged",
                        step, len(damaged))
      return restored
    raise errors.CheckpointError(
      f"none of the checkpoints in {self.directory} could be read; they were moved to "
      f"{', '.join(damaged)}. Rerun to start from step 0, or move one back to retry it")

  def _set_aside(self, step: int, error: Exception) -> str:
    """Moves a damaged checkpoint aside; raises errors.CheckpointError, moving nothing, when `error`
    is not damage."""
    src = paths.join(self.directory, str(step))
    if not is_damage(error):
      network = isinstance(error, (ConnectionError, TimeoutError)) or _names(error, _NETWORK)
      kind = errors.NetworkError if network else errors.CheckpointError
      raise kind(f"checkpoint {src} could not be read, for a reason that says nothing about its "
                 f"files, so it was left in place: {type(error).__name__}: "
                 f"{str(error).splitlines()[0][:500] if str(error) else ''}") from error
    dest = paths.join(self.workdir, workdir_lib.DAMAGED, f"{step}-{int(time.time())}")
    logging.error("checkpoint %s is damaged and will not be used (%s: %s); moving it to %s",
                  src, type(error).__name__, str(error).splitlines()[0][:500], dest)
    if jax.process_index() == 0:
      paths.move(src, dest)
    # Every process must see the move before the manager rescans its steps.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return dest


def read_params_at(directory: str, step: int, abstract_params: Any, model_cfg: Any,
                   where: str) -> Any:
  """Only the parameters of checkpoint `step` in `directory` (a checkpoints/ folder), onto
  `abstract_params`' shardings, refusing a model of another shape than `model_cfg`'s."""
  manager = _read_only_manager(directory)
  try:
    refuse_other_shape(_read_config(manager, step).get("model", {}), model_cfg, where)
    return _read_params(manager, step, abstract_params, where)
  finally:
    manager.close()


def steps_on_disk(workdir: str) -> Sequence[int]:
  """Complete checkpoint steps under `workdir`, oldest first."""
  return step_dirs(paths.join(workdir, workdir_lib.CHECKPOINTS))


def load_run(workdir: str, step: int | None = None) -> tuple[Any, Any, int]:
  """(config, parameters, step) of a training run's checkpoint: the newest, or `step`.

  The config is the one the checkpoint was written with; the parameters land on the default
  device. Used by evaluation, sampling and export.
  """
  paths.check_backend(workdir)
  steps = steps_on_disk(workdir)
  if not steps:
    raise errors.CheckpointError(f"{workdir} has no checkpoint (looked in "
                                 f"{paths.join(workdir, workdir_lib.CHECKPOINTS)})")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise errors.CheckpointError(f"{workdir} has no checkpoint for step {step}; it has {steps}")
  manager = _read_only_manager(paths.join(workdir, workdir_lib.CHECKPOINTS))
  try:
    cfg = config_lib.from_json(json.dumps(_read_config(manager, step)))
    abstract = sharding.abstract(model.abstract_params(cfg.model),
                                 jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return cfg, _read_params(manager, step, abstract, workdir), step
  finally:
    manager.close()

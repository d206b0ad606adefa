"""One run per workdir: a run holds its workdir through WORKDIR/lease.json while it trains.

The lease names its holder (host, pid, when it started, how many processes) and carries a
heartbeat that process 0 renews every HEARTBEAT_S seconds. A second run on a held workdir stops
before it touches anything, naming the holder. A lease whose heartbeat is older than STALE_S
seconds, or whose holder ran on this host and no longer exists, is left from a run that died
(SIGKILL, a lost machine): it is taken over, with a warning, so that a crashed run does not
block its own restart; so is one held by an earlier attempt of the same SLURM job. The processes of one multi-process run share process 0's lease. A run whose
lease was taken over (its heartbeat stalled that long) stops at its next step, without saving.

It works on object stores too (a bucket workdir): a new lease is written and read back after a
moment, and the run whose lease was read back holds the workdir. On a disk, a lease file is
created exclusively (O_EXCL), which settles a race at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from nanollama_jax import errors, paths
from nanollama_jax import workdir as workdir_lib

HEARTBEAT_S = 30.0
STALE_S = 300.0  # no heartbeat for this long: the holder is gone
_SETTLE_S = 2.0  # an object store: how long two writers of one new lease may race


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  run: str  # a random id of the holding run
  started: float  # seconds since the epoch
  heartbeat: float
  processes: int = 1
  # Under SLURM: the job and its attempt (SLURM_RESTART_COUNT). A later attempt of the same job
  # takes the lease over at once: SLURM requeues a job only after every task of it has ended.
  slurm_job: str = ""
  slurm_attempt: int = 0

  def describe(self, now: float) -> str:
    return (f"host {self.host}, pid {self.pid}, {self.processes} process(es), started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last "
            f"heartbeat {now - self.heartbeat:.0f}s ago")


def read(workdir: str) -> Holder | None:
  """The workdir's lease; None when there is none. One that cannot be read is a lease of no one,
  whose heartbeat never beat (it is taken over)."""
  where = workdir_lib.path(workdir, workdir_lib.LEASE)
  try:
    raw = json.loads(paths.read_text(where))
    # Fields added since an older lease was written keep their defaults.
    return Holder(**{f.name: raw[f.name] for f in dataclasses.fields(Holder) if f.name in raw})
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):  # a torn or foreign file: held by no one
    return Holder(host="", pid=0, run="", started=0.0, heartbeat=0.0)


def _alive_here(holder: Holder) -> bool:
  """Whether the holder is a live process of this host (False when it ran on another host)."""
  if holder.host != socket.gethostname():
    return False
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _gone(holder: Holder, now: float) -> str | None:
  """Why `holder` no longer holds the workdir, or None while it does."""
  if not holder.run:
    return "the lease file cannot be read"
  if holder.host == socket.gethostname() and not _alive_here(holder):
    return f"its process {holder.pid} no longer runs on this host"
  job, attempt = _slurm_attempt()
  if holder.slurm_job and holder.slurm_job == job and holder.slurm_attempt < attempt:
    return (f"it was attempt {holder.slurm_attempt} of this SLURM job {job}, which SLURM "
            f"requeued (this is attempt {attempt})")
  if now - holder.heartbeat > STALE_S:
    return f"its last heartbeat is {now - holder.heartbeat:.0f}s old (over {STALE_S:.0f}s)"
  return None


def _slurm_attempt() -> tuple[str, int]:
  """This process's SLURM job and attempt; ("", 0) outside SLURM."""
  return os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class Lease:
  """The lease this run holds; `release()` gives it back (process 0 removes the file)."""

  def __init__(self, workdir: str, holder: Holder | None):
    self.workdir = workdir
    self.holder = holder  # None on processes other than 0: they share process 0's lease
    # The run that took the lease over, if one did (this run's heartbeat had stalled): the
    # training loop then stops.
    self.lost: Holder | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    if holder is not None:
      self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
      self._thread.start()

  def _beat(self) -> None:
    assert self.holder is not None
    while not self._stop.wait(HEARTBEAT_S):
      try:
        now_held = read(self.workdir)
        if now_held is not None and not now_held.run:
          continue  # caught mid-write (or damaged): look again at the next beat
        if now_held is not None and now_held.run != self.holder.run:
          self.lost = now_held  # the training loop stops at its next step
          return
        self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
        _write(self.workdir, self.holder)
      except OSError as e:  # a network hiccup: the next beat tries again
        logging.warning("could not renew the lease of %s: %s", self.workdir, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is None:
      return
    self._thread.join()
    try:
      held = read(self.workdir)
      if held is not None and held.run == self.holder.run:
        paths.remove(workdir_lib.path(self.workdir, workdir_lib.LEASE))
    except OSError as e:
      logging.warning("could not remove the lease of %s: %s", self.workdir, e)


def _write(workdir: str, holder: Holder, exclusive: bool = False) -> bool:
  """Writes the lease; with `exclusive` on a disk, only if there is none (returns False if one
  appeared)."""
  where = workdir_lib.path(workdir, workdir_lib.LEASE)
  text = json.dumps(dataclasses.asdict(holder))
  if exclusive and not paths.is_remote(workdir):
    paths.makedirs(workdir)
    try:
      fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  paths.write(where, text)
  return True


def _take(workdir: str) -> Holder:
  """Process 0's side of `acquire`: the new holder, or errors.WorkdirHeld."""
  now = time.time()
  job, attempt = _slurm_attempt()
  mine = Holder(host=socket.gethostname(), pid=os.getpid(), run=uuid.uuid4().hex, started=now,
                heartbeat=now, processes=jax.process_count(), slurm_job=job,
                slurm_attempt=attempt)
  for _ in range(3):
    held = read(workdir)
    if held is not None:
      why = _gone(held, time.time())
      if why is None:
        raise errors.WorkdirHeld(
          f"the workdir {workdir} is in use by another run ({held.describe(now)}): stop that run "
          f"first, or use another workdir (a run that died is taken over {STALE_S / 60:.0f} "
          "minutes after its last heartbeat)")
      logging.warning("taking over the workdir %s from a run that is gone (%s): %s", workdir,
                      held.describe(now), why)
      _write(workdir, mine)
    elif not _write(workdir, mine, exclusive=True):
      continue  # another run created it just now: look at it again
    if not paths.is_remote(workdir) and held is None:
      return mine  # created exclusively
    time.sleep(_SETTLE_S if paths.is_remote(workdir) else 0.2)
    if (now_held := read(workdir)) is not None and now_held.run == mine.run:
      return mine
  raise errors.WorkdirHeld(f"the workdir {workdir} is being taken by another run at the same "
                           "moment: stop the other one, or use another workdir")


def acquire(workdir: str) -> Lease:
  """Takes the workdir for this run (every process calls it); raises errors.WorkdirHeld, before
  anything in the workdir changes, when another live run holds it."""
  holder, refusal = None, ""
  if jax.process_index() == 0:
    try:
      holder = _take(workdir)
    except errors.WorkdirHeld as e:
      refusal = str(e)
    except OSError as e:
      raise errors.CheckpointError(f"the workdir {workdir} is not writable: {e}") from e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    refused = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
    if int(refused) and not refusal:
      held = read(workdir)
      refusal = (f"the workdir {workdir} is in use by another run"
                 f"{f' ({held.describe(time.time())})' if held else ''}: process 0 refused it")
  if refusal:
    raise errors.WorkdirHeld(refusal)
  return Lease(workdir, holder)


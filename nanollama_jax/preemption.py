"""Stopping a run cleanly: SIGTERM/SIGINT become a request to save a checkpoint and stop."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Turns the first SIGTERM/SIGINT into a request to save and stop; a second one kills at once.

  With several processes the request comes from JAX's preemption sync point instead, so that
  every process stops after the same step (JAX's distributed runtime watches SIGTERM there); a
  signal seen by one process alone must not stop it while the others wait in a collective.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in self._SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:  # the second signal: die now, as if no handler were installed
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                    "stopping (send it again to exit at once)", signal.Signals(signum).name)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (every process of a run answers the same)."""
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

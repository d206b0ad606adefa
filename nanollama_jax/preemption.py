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
  signal seen by one process alone must not stop it while the others wait in a collective. A
  SIGINT (Ctrl-C) is handed to that runtime as a SIGTERM of its own process, and the process
  that saw it stops as interrupted (exit 130), not preempted.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._interrupted = False
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._multi else self._SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None or self._interrupted:  # the second: die now, as if unhandled
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                    "stopping (send it again to exit at once)", signal.Signals(signum).name)
    if self._multi:  # JAX's runtime tells every process to stop at the same step
      self._interrupted = True
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.signum = signum

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (every process of a run answers the same)."""
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGINT if self._interrupted else signal.SIGTERM
    return self.signum is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

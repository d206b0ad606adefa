"""Profiles of training steps: `train.profile_steps="START:STOP"` traces steps START..STOP-1.

Each process writes a jax.profiler trace into WORKDIR/profile/process_<i>/: XProf's
`plugins/profile/<time>/<host>.xplane.pb`, which TensorBoard's profile plugin opens, and a
`perfetto_trace.json.gz` that https://ui.perfetto.dev opens. Steps are numbered as the logs
number them (the first step of a run is 1). A bucket workdir gets the files copied in once the
trace is complete (the profiler writes to a local directory). With profile_steps empty nothing
happens: the loop's cost is one comparison per step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import jax
from absl import logging

from nanollama_jax import config, paths
from nanollama_jax import workdir as workdir_lib


class Profiler:
  """Starts a trace before step `start` and ends it after step `stop - 1` (see the module doc)."""

  def __init__(self, spec: str, workdir: str):
    self.steps = config.profile_steps(spec)
    self.root = workdir_lib.path(workdir, workdir_lib.PROFILE)
    self.directory = paths.join(self.root, f"process_{jax.process_index()}")
    self._local: str | None = None  # where the running trace is written

  def step(self, done: int) -> contextlib.AbstractContextManager:
    """Wraps the dispatch of step `done`: starts the trace at the first step, and names it."""
    if self.steps is None or not self.steps[0] <= done < self.steps[1]:
      return contextlib.nullcontext()
    if self._local is None:
      self._local = (tempfile.mkdtemp(prefix="nanollama-profile-")
                     if paths.is_remote(self.directory) else self.directory)
      paths.makedirs(self._local)
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)
      logging.info("profiling steps %d..%d", *self.steps)
    return jax.profiler.StepTraceAnnotation("train", step_num=done)

  def after(self, done: int, state: Any) -> None:
    """Ends the trace after its last step, once the device has finished it."""
    if self._local is not None and done == self.steps[1] - 1:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    """Ends a running trace (also when the run stops inside the profiled steps)."""
    if self._local is None:
      return
    jax.profiler.stop_trace()
    local, self._local = self._local, None
    if local != self.directory:
      for root, _, files in os.walk(local):
        for name in files:
          rel = os.path.relpath(os.path.join(root, name), local)
          with open(os.path.join(root, name), "rb") as f:
            paths.write(paths.join(self.directory, rel), f.read())
      paths.remove(local)
    if jax.process_index() == 0:
      logging.info("profile of steps %d..%d written to %s: open it with `tensorboard --logdir "
                   "%s` (the profile tab: pip install tensorboard tensorboard-plugin-profile), "
                   "or load its perfetto_trace.json.gz into https://ui.perfetto.dev",
                   self.steps[0], self.steps[1] - 1, self.directory, self.root)

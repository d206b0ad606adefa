"""Where a run's numbers go: the console, WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from absl import logging
from tensorboardX import SummaryWriter


def _row_step(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a blank or cut-off line (a crash mid-write)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def perplexity(loss: float) -> float:
  """exp(loss), saturating at infinity instead of overflowing."""
  return math.exp(loss) if loss < 700 else math.inf


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

  Rows after `start_step` left by an earlier run of the same workdir are dropped, so the file
  describes the run that continues from `start_step` (0: a fresh run). Only process 0 writes;
  on the others every call is a no-op.
  """

  def __init__(self, workdir: str, start_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        kept = [line for line in f if _row_step(line) is not None and
                _row_step(line) <= start_step]
      # Replaced in one rename, so a crash here cannot lose the earlier rows.
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      # purge_step makes TensorBoard drop the events an interrupted run logged after start_step.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                               purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, row: dict[str, Any]) -> None:
    """Records the numbers of `row` (plain Python scalars) at `step`."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in row.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def log_line(step: int, total_steps: int, row: dict[str, Any], eta_s: float | None) -> None:
  """Logs a one-line summary of `row` on process 0."""
  if jax.process_index() != 0:
    return
  parts = [f"step {step}/{total_steps}"]
  for key, value in row.items():
    if isinstance(value, float):
      parts.append(f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.3e}")
    else:
      parts.append(f"{key} {value}")
  if eta_s is not None:
    parts.append(f"eta {int(eta_s // 60)}m{int(eta_s % 60):02d}s")
  logging.info(" | ".join(parts))

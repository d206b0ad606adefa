"""The workdir contract: the name of everything a run writes, and the one reader of its metrics.

```
WORKDIR/
  config.json            CONFIG: the resolved config
  tokenizer.model        the tokenizer the run uses, as its own files: a sentencepiece model,
  (or tokenizer.json,    or a Hugging Face tokenizer.json with its configuration
  tokenizer_config.json  (data/tokenizer_source.py)
  ...)
  checkpoints/<step>/    CHECKPOINTS: orbax checkpoints (checkpoint.py)
  checkpoints_damaged/   DAMAGED: checkpoints whose bytes failed their fingerprints, moved aside
  metrics.jsonl          METRICS: one JSON object per logged step (tracking.Jsonl)
  tb/                    TENSORBOARD: TensorBoard event files
  profile/               PROFILE: jax.profiler traces (train.profile_steps)
  lease.json             LEASE: the run training here now, and its heartbeat (lease.py)
  wandb_run.json         WANDB_RUN: the Weights & Biases run id, with wandb.project set
  wandb/                 Weights & Biases' own files, for a local workdir (tracking.py)
```

A workdir may be a local directory or a bucket URL (paths.py).
"""

from __future__ import annotations

import json
from typing import Any

from nanollama_jax import errors, paths

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints_damaged"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
PROFILE = "profile"
LEASE = "lease.json"
WANDB_RUN = "wandb_run.json"


def path(workdir: str, name: str) -> str:
  """WORKDIR/name, for a local directory or a bucket."""
  return paths.join(workdir, name)


def parse_metrics(text: str, where: str = METRICS) -> list[dict[str, Any]]:
  """The rows of metrics.jsonl text; a cut-off last line (a crash mid-write) is skipped.

  Raises CheckpointError for a line that is not JSON anywhere else: that file was damaged.
  """
  lines = text.splitlines()
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not text.endswith("\n"):
        continue  # the writer died before the newline: that row was never complete
      raise errors.CheckpointError(f"{where}, line {number}: not JSON ({e})") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise errors.CheckpointError(f"{where}, line {number}: not a metrics row (no integer step)")
    rows.append(row)
  return rows


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every complete row of WORKDIR/metrics.jsonl, in order; [] when the run logged nothing yet."""
  where = path(workdir, METRICS)
  return parse_metrics(paths.read_text(where), where) if paths.exists(where) else []


def latest(rows: list[dict[str, Any]], keys: tuple[str, ...],
           until_step: int | None = None) -> dict[str, Any]:
  """The newest value of each of `keys` in rows at or before `until_step` (default: all)."""
  found: dict[str, Any] = {}
  for row in rows:
    if until_step is None or row["step"] <= until_step:
      found.update({k: row[k] for k in keys if k in row})
  return found


class FailedStart:
  """Removes what a run created in its workdir when it fails before its first step.

  A workdir left with a config and a tokenizer but no step would be taken for a run by the next
  command (which would reuse a tokenizer trained for a run that never happened). Set `started`
  once the first step ran. Only process 0 removes anything.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    self.process_index = process_index
    self.existed = paths.isdir(workdir)
    self.before = set(paths.listdir(workdir))
    self.started = False

  def __enter__(self) -> FailedStart:
    return self

  def __exit__(self, kind, error, tb) -> None:
    if kind is None or self.started or self.process_index != 0:
      return
    if not self.existed:
      paths.remove(self.workdir)
      return
    for name in set(paths.listdir(self.workdir)) - self.before:
      paths.remove(path(self.workdir, name))

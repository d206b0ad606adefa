"""Where a run's numbers go: one `Tracker` interface, a class per sink, and `Trackers`, which
hands every call to all of them (the shape of Levanter's composite tracker).

  Jsonl        WORKDIR/metrics.jsonl: one JSON object per logged row, what the scripts read
  TensorBoard  WORKDIR/tb/: the scalars, the samples as text, the config once as text
  Wandb        Weights & Biases, with wandb.project set: the scalars, the samples as a table,
               the config once; a restarted run continues the same W&B run; never blocks training

Every value a run logs (loss, perplexity, learning rate, gradient norm, tokens/s, tokens seen,
MFU, evaluation) reaches every sink through one `Trackers.log(step, row)`. Only process 0
writes. Adding a sink is one `Tracker` subclass and a line in `open_trackers`.
"""

from __future__ import annotations

import abc
import json
import math
import os
import queue
import secrets
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from nanollama_jax import hf_files, paths
from nanollama_jax import workdir as workdir_lib


class Tracker(abc.ABC):
  """One sink of a run's numbers."""

  @abc.abstractmethod
  def log(self, step: int, row: dict[str, Any]) -> None:
    """Records the numbers of `row` (plain Python scalars) at `step`."""

  def log_texts(self, step: int, tag: str, texts: Sequence[str]) -> None:  # noqa: B027
    """Records texts (the run's samples) under `tag` at `step`; a sink without texts skips them."""

  def log_config(self, config: dict[str, Any]) -> None:  # noqa: B027
    """Records the run's resolved config, once, at its start."""

  def flush(self) -> None:  # noqa: B027
    """Makes what was logged so far durable (called when a checkpoint is saved)."""

  def close(self) -> None:  # noqa: B027
    """Flushes and releases the sink."""


def _scalars(row: dict[str, Any]) -> dict[str, float]:
  return {k: v for k, v in row.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Jsonl(Tracker):
  """Appends one JSON object per logged row to metrics.jsonl.

  Rows after `start_step` left by an earlier run of the same workdir are dropped, so the file
  describes the run that continues from `start_step` (0: a fresh run). In an object store (a
  gs:// workdir), which cannot append, the rows are kept and the file is rewritten whole at most
  every REMOTE_FLUSH_S, at `flush` and at close.
  """

  REMOTE_FLUSH_S = 30.0

  def __init__(self, workdir: str, start_step: int = 0):
    self._path = workdir_lib.path(workdir, workdir_lib.METRICS)
    self._file = None
    # Rewritten whole (a rename on a disk), so a crash here cannot lose the earlier rows.
    self._rows = [json.dumps(row) + "\n" for row in workdir_lib.read_metrics(workdir)
                  if row["step"] <= start_step]
    paths.write(self._path, "".join(self._rows))
    self._flushed = time.monotonic()
    if not paths.is_remote(self._path):
      self._file = open(self._path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def log(self, step: int, row: dict[str, Any]) -> None:
    line = json.dumps({"step": step, **row}) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._rows.append(line)
    if time.monotonic() - self._flushed > self.REMOTE_FLUSH_S:
      self._rewrite()

  def flush(self) -> None:
    if self._file is None:
      self._rewrite()

  def _rewrite(self) -> None:
    paths.write(self._path, "".join(self._rows))
    self._flushed = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self._rewrite()


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch when it is installed only to accept torch tensors, which we never
  log: about 2 s and 300 MB more at every start of a run beside a PyTorch install.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter


class TensorBoard(Tracker):
  """WORKDIR/tb/: every finite scalar, samples in the text tab, the config once as text."""

  def __init__(self, workdir: str, start_step: int = 0):
    # purge_step makes TensorBoard drop the events an interrupted run logged after start_step.
    self._tb = _summary_writer()(workdir_lib.path(workdir, workdir_lib.TENSORBOARD),
                                 purge_step=start_step + 1 if start_step else None)

  def log(self, step: int, row: dict[str, Any]) -> None:
    for key, value in _scalars(row).items():
      self._tb.add_scalar(key, value, step)

  def log_texts(self, step: int, tag: str, texts: Sequence[str]) -> None:
    self._tb.add_text(tag, "\n\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1)), step)
    self._tb.flush()

  def log_config(self, config: dict[str, Any]) -> None:
    self._tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

  def flush(self) -> None:
    """Writes the events tensorboardX's thread has taken up (it writes them every two minutes
    otherwise; to a bucket, whole each time)."""
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


# --- Weights & Biases --------------------------------------------------------------------------

PROBE_TIMEOUT_S = 5.0  # an online W&B that does not answer within this is taken as unreachable
INIT_TIMEOUT_S = 30.0  # wandb.init's own bound (it runs beside training, not in its way)
CLOSE_TIMEOUT_S = 60.0  # at the end, how long the run waits for W&B to take the last rows


def wandb_dir(workdir: str) -> str:
  """The local directory W&B keeps a run's files in (WANDB_DIR/wandb/...): the workdir itself
  for a local workdir; for a bucket, which W&B cannot write to,
  ~/.cache/nanollama_jax/wandb/BUCKET/PATH (W&B uploads from there in online mode)."""
  if not paths.is_remote(workdir):
    return paths.resolve(workdir)
  scheme, _, rest = str(workdir).partition("://")
  return os.path.join(os.path.expanduser("~"), ".cache", "nanollama_jax", "wandb", scheme,
                      *rest.strip("/").split("/"))


def _run_id(workdir: str) -> str:
  """The W&B run id of the run in `workdir`: kept in WORKDIR/wandb_run.json from its first start,
  so every restart continues the same W&B run."""
  path = workdir_lib.path(workdir, workdir_lib.WANDB_RUN)
  if paths.exists(path):
    return json.loads(paths.read_text(path))["id"]
  run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
  paths.write(path, json.dumps({"id": run_id}))
  return run_id


class Wandb(Tracker):
  """Weights & Biases, fed by a thread of its own: `log` only queues, so training never waits on
  the network or on W&B's start (wandb.init runs in the thread, bounded by INIT_TIMEOUT_S, after
  a probe of an online server that answers within PROBE_TIMEOUT_S). If W&B cannot start or
  fails later, one warning says so and the run goes on with its other sinks.

  A restarted run continues the same W&B run (the id in WORKDIR/wandb_run.json,
  resume="allow"), and W&B ends up with every row of metrics.jsonl. W&B refuses steps lower than
  the last it holds, and a run resumed from a checkpoint replays the steps it took after that
  checkpoint before it stopped: the steps W&B holds (read from its local .wandb files and, online,
  the resumed run's starting step) are not sent again, so W&B keeps their first values, while
  metrics.jsonl has the replay's (the same losses, the replay being exact; other timings). The
  rows of metrics.jsonl up to the resumed step that W&B does not hold (lost with a killed
  process) are sent first.
  """

  def __init__(self, wandb_cfg: ml_collections.ConfigDict, workdir: str, start_step: int = 0):
    self._cfg, self._workdir, self._start_step = wandb_cfg, workdir, start_step
    self._dir = wandb_dir(workdir)
    self._id = _run_id(workdir)
    self._name = wandb_cfg.name or os.path.basename(str(workdir).rstrip("/"))
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self.replayed_until = 0  # the last step W&B held when this run started
    self._thread = threading.Thread(target=self._work, name="wandb", daemon=True)
    self._thread.start()

  def log(self, step: int, row: dict[str, Any]) -> None:
    self._queue.put(("log", (step, _scalars(row))))

  def log_texts(self, step: int, tag: str, texts: Sequence[str]) -> None:
    self._queue.put(("texts", (step, tag, list(texts))))

  def log_config(self, config: dict[str, Any]) -> None:
    self._queue.put(("config", (config,)))

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(CLOSE_TIMEOUT_S)
    if self._thread.is_alive():
      logging.warning("Weights & Biases did not take the run's last rows within %.0f s; they "
                      "stay in metrics.jsonl", CLOSE_TIMEOUT_S)

  def _start(self):
    import wandb  # pylint: disable=import-outside-toplevel
    if self._cfg.mode == "online":
      base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
      reason = hf_files.unreachable(base_url, PROBE_TIMEOUT_S)
      if reason:
        raise ConnectionError(f"{base_url} cannot be reached ({reason})")
    os.makedirs(self._dir, exist_ok=True)
    self.replayed_until = max(
      [0, *(max(wandb_history_steps(p), default=0) for p in self.run_files())])
    run = wandb.init(
      project=self._cfg.project, entity=self._cfg.entity or None, name=self._name,
      group=self._cfg.group or None, tags=[t for t in self._cfg.tags.split(",") if t] or None,
      mode=self._cfg.mode, id=self._id, resume="allow", dir=self._dir,
      settings=wandb.Settings(console="off", silent=True, init_timeout=INIT_TIMEOUT_S))
    self.replayed_until = max(self.replayed_until, getattr(run, "starting_step", 0) - 1)
    logging.info("Weights & Biases: run %s of project %s (%s), files in %s", self._id,
                 self._cfg.project, self._cfg.mode, os.path.join(self._dir, "wandb"))
    self._backfill(run)
    return run

  def _backfill(self, run) -> None:
    """Sends the rows of metrics.jsonl up to the resumed step that W&B does not hold: a run
    killed before W&B wrote them out (offline mode writes its file at the end) still has them
    all in metrics.jsonl, and the resumed run does not log them again."""
    rows = [r for r in workdir_lib.read_metrics(self._workdir)
            if self.replayed_until < r["step"] <= self._start_step]
    for row in rows:
      run.log(_scalars({k: v for k, v in row.items() if k != "step"}), step=row["step"])
    if rows:
      logging.info("Weights & Biases: sent the %d rows of metrics.jsonl from step %d to %d that "
                   "it did not hold", len(rows), rows[0]["step"], rows[-1]["step"])
      self.replayed_until = max(self.replayed_until, rows[-1]["step"])

  def run_files(self) -> list[str]:
    """This run's .wandb files under the W&B directory, oldest first."""
    root = os.path.join(self._dir, "wandb")
    found = [os.path.join(root, d, f"run-{self._id}.wandb") for d in sorted(os.listdir(root))
             if d.endswith(f"-{self._id}")] if os.path.isdir(root) else []
    return [f for f in found if os.path.isfile(f)]

  def _work(self) -> None:
    try:
      run = self._start()
    except Exception as e:  # pylint: disable=broad-except  # whatever W&B raises, the run goes on
      self._give_up(f"cannot start ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
      return
    skipped = []
    while (item := self._queue.get()) is not None:
      kind, args = item
      try:
        if kind == "config":
          run.config.update(args[0], allow_val_change=True)
        elif args[0] <= self.replayed_until:
          skipped.append(args[0])
        elif kind == "log":
          run.log(args[1], step=args[0])
        else:
          import wandb  # pylint: disable=import-outside-toplevel
          step, tag, texts = args
          run.log({tag: wandb.Table(columns=["text"], data=[[t] for t in texts])}, step=step)
      except Exception as e:  # pylint: disable=broad-except
        self._give_up(f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
        return
    if skipped:
      logging.info("Weights & Biases already held steps up to %d: the %d rows of the replayed "
                   "steps %d-%d were not sent again", self.replayed_until, len(skipped),
                   min(skipped), max(skipped))
    run.finish()
    # finish returns once W&B's service has the exit record, which it writes to the .wandb file
    # with the last rows a moment later: a resumed run in this process reads that file.
    if not wait_for_wandb_file(run.settings.sync_file, CLOSE_TIMEOUT_S / 2):
      logging.warning("Weights & Biases had not written the end of %s within %.0f s",
                      run.settings.sync_file, CLOSE_TIMEOUT_S / 2)

  def _give_up(self, why: str) -> None:
    logging.warning("Weights & Biases %s: the run goes on with metrics.jsonl and TensorBoard",
                    why)
    while self._queue.get() is not None:  # drop what is queued, until close()
      pass


# The .wandb file: W&B's transaction log, LevelDB's log format. A 7-byte file header, then
# blocks of 32 KiB, each a sequence of records with a 7-byte header (crc32: 4 bytes, length: 2,
# type: 1) and `length` bytes of a wandb_internal_pb2.Record, cut into FIRST/MIDDLE/LAST pieces
# where one does not fit in its block.
_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str) -> Iterator[Any]:
  """The records of a .wandb file (`wandb.proto.wandb_internal_pb2.Record`), in order; a
  record cut off at the end (a process killed mid-write) is skipped."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    data = f.read()
  pos, pieces = _HEADER, b""
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    body = data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    if len(body) < length or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
      break  # the end of what was written
    pieces = body if kind in (_FULL, _FIRST) else pieces + body
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pieces)
      yield record


def wandb_file_complete(path: str) -> bool:
  """Whether a .wandb file holds its run's exit record, the last one W&B writes."""
  try:
    return any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path))
  except Exception:  # pylint: disable=broad-except  # not there yet, or a block being written
    return False


def wait_for_wandb_file(path: str, timeout_s: float) -> bool:
  """Waits until the .wandb file of a finished run is complete: W&B's service writes the last
  records (the last history row among them) after `run.finish()` has returned."""
  deadline = time.monotonic() + timeout_s
  while not wandb_file_complete(path):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def wandb_history(path: str) -> list[dict[str, Any]]:
  """The history rows of a .wandb file: {"_step": ..., key: value}, in the order logged."""
  rows = []
  for record in wandb_records(path):
    if record.WhichOneof("record_type") == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item})
  return rows


def wandb_history_steps(path: str) -> list[int]:
  return [row["_step"] for row in wandb_history(path) if "_step" in row]


# --- All of them --------------------------------------------------------------------------------


class Trackers(Tracker):
  """Hands every call to each of its sinks."""

  def __init__(self, sinks: Sequence[Tracker] = ()):
    self.sinks = list(sinks)

  def log(self, step: int, row: dict[str, Any]) -> None:
    for sink in self.sinks:
      sink.log(step, row)

  def log_texts(self, step: int, tag: str, texts: Sequence[str]) -> None:
    for sink in self.sinks:
      sink.log_texts(step, tag, texts)

  def log_config(self, config: dict[str, Any]) -> None:
    for sink in self.sinks:
      sink.log_config(config)

  def flush(self) -> None:
    for sink in self.sinks:
      sink.flush()

  def close(self) -> None:
    for sink in self.sinks:
      sink.close()


def open_trackers(cfg: ml_collections.ConfigDict, workdir: str, start_step: int) -> Trackers:
  """The sinks of a run resumed at `start_step` (0: a fresh one), its config recorded in each;
  none on processes other than 0."""
  if jax.process_index() != 0:
    return Trackers()
  sinks: list[Tracker] = [Jsonl(workdir, start_step), TensorBoard(workdir, start_step)]
  if cfg.wandb.project:
    sinks.append(Wandb(cfg.wandb, workdir, start_step))
  trackers = Trackers(sinks)
  trackers.log_config(cfg.to_dict())
  return trackers

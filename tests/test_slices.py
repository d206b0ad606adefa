"""Pod runs: preemption of several processes, and resuming on another slice.

Data streams make the global batches independent of the processes that read them (see
data/pipeline.py): checked here by the token ids of the batches, then end to end by training with
2 processes x 2 CPU devices (jax.distributed on 127.0.0.1), stopping them with SIGTERM, and
resuming the checkpoint in 2 x 2, 1 x 4 and 1 x 2 devices, and a 1-process run in 2 processes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, cpu_env, tiny_run_args
from nanollama_jax import checkpoint, config, errors, workdir as workdir_lib
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer_source import load as load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return load_tokenizer(str(tokenizer_path))


def _data_cfg(sample_dir, **fields):
  cfg = config.get_default_config().data
  cfg.update(dict(train_files=str(sample_dir / "train.jsonl"), seq_len=32, batch_size=8))
  cfg.update(fields)
  return cfg


def _global(readers, steps):
  """`steps` global batches, each the rows of `readers` (one per share, in order) put together."""
  out = []
  for _ in range(steps):
    parts = [next(r) for r in readers]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in pipeline.KEYS})
  return out


def _saved(readers, streams, batch_size):
  """The data item a checkpoint would hold: each stream's position from the process that saves
  it, shares being processes that each hold one block of rows."""
  shares = len(readers)
  blocks = [(i * batch_size // shares, (i + 1) * batch_size // shares) for i in range(shares)]
  writers = pipeline.stream_writers(blocks, batch_size, streams)
  positions = {}
  for s, p in enumerate(writers):
    positions[str(s)] = readers[p].get_state()["positions"][str(s)]
  return json.loads(json.dumps({"streams": streams, "positions": positions}))


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_global_batches_do_not_depend_on_the_processes_reading_them(sample_dir, tok, packing):
  cfg = _data_cfg(sample_dir, packing=packing)
  reference = _global([pipeline.train_batches(cfg, tok, 0, 1, 4)], 10)
  for shares in (2, 4, 8):
    readers = [pipeline.train_batches(cfg, tok, i, shares, 4) for i in range(shares)]
    got = _global(readers, 10)
    for a, b in zip(got, reference):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])
      np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
  # Checkpointed by 2 readers after 6 batches, resumed by 1, 4 and 8: the batches 7..10.
  readers = [pipeline.train_batches(cfg, tok, i, 2, 4) for i in range(2)]
  _global(readers, 6)
  state = _saved(readers, 4, 8)
  assert sorted(state["positions"]) == ["0", "1", "2", "3"]
  for shares in (1, 4, 8):
    resumed = [pipeline.train_batches(cfg, tok, i, shares, 4) for i in range(shares)]
    for r in resumed:
      r.set_state(state)
    for a, b in zip(_global(resumed, 4), reference[6:]):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])
      np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def test_one_stream_is_read_whole_by_each_of_more_processes(sample_dir, tok):
  """A run started in 1 process (1 stream) resumed in 2: each reads the stream and keeps its
  rows; no window is repeated or skipped."""
  cfg = _data_cfg(sample_dir)
  reference = _global([pipeline.train_batches(cfg, tok)], 8)
  first = pipeline.train_batches(cfg, tok)
  _global([first], 5)
  state = _saved([first], 1, 8)
  resumed = [pipeline.train_batches(cfg, tok, i, 2, 1) for i in range(2)]
  assert [r.read for r in resumed] == [[0], [0]]
  for r in resumed:
    r.set_state(state)
  for a, b in zip(_global(resumed, 3), reference[5:]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_stream_rows_and_writers():
  # 8 rows in 4 streams of 2 rows, read by 2 processes of 4 rows: two streams each.
  assert pipeline.stream_rows(8, 4, 1, 2) == [(2, slice(0, 2)), (3, slice(0, 2))]
  # 1 stream of 8 rows read by 4 processes: each keeps its 2 rows of it.
  assert pipeline.stream_rows(8, 1, 3, 4) == [(0, slice(6, 8))]
  # 2 streams of 4 rows read by 4 processes of 2 rows: processes 0 and 2 save them.
  blocks = [(0, 2), (2, 4), (4, 6), (6, 8)]
  assert pipeline.stream_writers(blocks, 8, 2) == [0, 2]
  # Two processes holding the same rows (tensor parallelism across hosts): the first saves.
  assert pipeline.stream_writers([(0, 8), (0, 8)], 8, 2) == [0, 0]


def test_the_data_item_reads_every_stream_and_older_per_process_files(tmp_path):
  handler = checkpoint._DataPositionsHandler()  # pylint: disable=protected-access
  from etils import epath
  d = epath.Path(tmp_path)
  handler.save(d, checkpoint.ProcessJsonSave({"streams": 2, "positions": {"1": {"x": 1}}}))
  handler.save(d, checkpoint.ProcessJsonSave({"streams": 2, "positions": {"0": {"x": 0}}}))
  assert sorted(os.listdir(tmp_path)) == ["stream_0-of-2.json", "stream_1-of-2.json"]
  assert handler.restore(d) == {"streams": 2, "positions": {"0": {"x": 0}, "1": {"x": 1}}}
  os.remove(tmp_path / "stream_1-of-2.json")
  with pytest.raises(errors.CheckpointError, match="does not hold the position of every"):
    handler.restore(d)
  older = tmp_path / "older"
  older.mkdir()
  for i in range(2):
    (older / f"process_{i}-of-2.json").write_text(json.dumps({"x": i}))
  assert handler.restore(epath.Path(older))["positions"] == {"0": {"x": 0}, "1": {"x": 1}}


@pytest.mark.parametrize("error, damage", [
  (ValueError("DATA_LOSS: Error reading: unexpected end of file"), True),
  (FileNotFoundError("manifest.ocdbt"), True),
  (ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB"), False),
  (ValueError("UNAVAILABLE: HTTP response code: 503"), False),
  (ConnectionError("reset by peer"), False),
  (PermissionError("denied"), False),
])
def test_only_errors_about_the_files_call_a_checkpoint_damaged(error, damage):
  assert checkpoint.is_damage(error) is damage


# --- End to end: processes on this machine ------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(workdir, sample_dir, tokenizer_path, steps, extra=()):
  return [sys.executable, "-m", "nanollama_jax.train",
          *tiny_run_args(workdir, sample_dir, tokenizer_path, steps), *extra]


def _start(workdir, sample_dir, tokenizer_path, steps, processes, devices, extra=()):
  """Starts a run in `processes` processes with `devices` CPU devices each."""
  if processes == 1:
    return [subprocess.Popen(_args(workdir, sample_dir, tokenizer_path, steps, extra), cwd=REPO,
                             env=cpu_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  port = _free_port()
  return [subprocess.Popen(
    _args(workdir, sample_dir, tokenizer_path, steps,
          [*extra, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
           f"--process_id={i}"]),
    cwd=REPO, env=cpu_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(processes)]


def _finish(procs, codes=(0,)):
  outputs = [p.communicate(timeout=300)[1] for p in procs]
  for p, err in zip(procs, outputs):
    assert p.returncode in codes, err[-3000:]
  return outputs


def _losses(workdir):
  return {r["step"]: r["loss"] for r in workdir_lib.read_metrics(str(workdir)) if "loss" in r}


def _last_step(workdir):
  losses = _losses(workdir) if os.path.exists(workdir / "metrics.jsonl") else {}
  return max(losses, default=0)


def _wait_for_step(workdir, procs, step):
  """Waits until the run's metrics reach `step`, every process still running."""
  deadline = time.time() + 300
  while _last_step(workdir) < step:
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
    assert time.time() < deadline, f"the run did not reach step {step}"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def preempted(sample_dir, tokenizer_path, tmp_path_factory):
  """A run of 2 processes x 2 devices stopped by SIGTERM (sent to both while they were held
  still after step 3), and the same run trained uninterrupted to 3 steps past that step."""
  root = tmp_path_factory.mktemp("slices")
  workdir = root / "preempted"
  procs = _start(workdir, sample_dir, tokenizer_path, 10_000, 2, 2)
  _wait_for_step(workdir, procs, 3)
  # The two processes share one lease: process 0's.
  held = json.loads((workdir / workdir_lib.LEASE).read_text())
  assert (held["pid"], held["processes"]) == (procs[0].pid, 2)
  for p in procs:  # hold both still, so that the signal reaches them between the same steps
    p.send_signal(signal.SIGSTOP)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  for p in procs:
    p.send_signal(signal.SIGCONT)
  outputs = _finish(procs, codes=(128 + signal.SIGTERM,))
  stopped = checkpoint.steps_on_disk(str(workdir))
  assert len(stopped) == 1, stopped
  stop = stopped[0]
  reference = root / "reference"
  _finish(_start(reference, sample_dir, tokenizer_path, stop + 3, 2, 2))
  return {"workdir": workdir, "stop": stop, "outputs": outputs, "reference": _losses(reference),
          "root": root}


@pytest.mark.slow
def test_ctrl_c_in_one_process_stops_both_after_the_same_step_with_a_checkpoint(
    sample_dir, tokenizer_path, tmp_path):
  """SIGINT to process 0 alone (Ctrl-C on one host of a multi-host run): JAX's runtime tells
  process 1, and both save and stop after one step; the one interrupted exits 130, the other
  as preempted (143)."""
  workdir = tmp_path / "interrupted"
  procs = _start(workdir, sample_dir, tokenizer_path, 10_000, 2, 2)
  _wait_for_step(workdir, procs, 3)
  procs[0].send_signal(signal.SIGINT)
  outputs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [128 + signal.SIGINT, 128 + signal.SIGTERM], [
    o[-3000:] for o in outputs]
  (stop,) = checkpoint.steps_on_disk(str(workdir))
  assert f"SIGINT received: stopped after step {stop} with a checkpoint" in outputs[0]
  assert f"SIGTERM received: stopped after step {stop} with a checkpoint" in outputs[1]
  assert "Traceback" not in outputs[0] + outputs[1]
  assert _last_step(workdir) == stop >= 3
  data = workdir / "checkpoints" / str(stop) / "data"
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
    "stream_0-of-2.json", "stream_1-of-2.json"]


def _copy(preempted, name):
  dest = preempted["root"] / name
  shutil.copytree(preempted["workdir"], dest)
  return dest


def _assert_close(got, reference, steps):
  assert sorted(got) == list(steps)
  diff = max(abs(got[s] - reference[s]) for s in steps)
  print(f"max |loss difference| over steps {steps.start}..{steps.stop - 1}: {diff:.3g}")
  assert diff < 1e-4, (got, reference)
  return diff


@pytest.mark.slow
def test_sigterm_stops_every_process_after_one_step_and_the_resume_continues(
    preempted, sample_dir, tokenizer_path):
  stop, outputs = preempted["stop"], preempted["outputs"]
  assert stop >= 3
  # Each process wrote its stream's position into the one checkpoint.
  data = preempted["workdir"] / "checkpoints" / str(stop) / "data"
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
    "stream_0-of-2.json", "stream_1-of-2.json"]
  assert f"SIGTERM received: stopped after step {stop} with a checkpoint" in outputs[0]
  assert "Traceback" not in outputs[0] + outputs[1]
  assert _last_step(preempted["workdir"]) == stop
  workdir = _copy(preempted, "resumed_2x2")
  _finish(_start(workdir, sample_dir, tokenizer_path, stop + 3, 2, 2))
  _assert_close(_losses(workdir), preempted["reference"], range(1, stop + 4))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 2])
def test_a_two_process_checkpoint_resumes_in_one_process(preempted, sample_dir, tokenizer_path,
                                                         devices):
  stop = preempted["stop"]
  workdir = _copy(preempted, f"resumed_1x{devices}")
  (err,) = _finish(_start(workdir, sample_dir, tokenizer_path, stop + 3, 1, devices))
  assert f"resuming from {workdir / 'checkpoints'}/{stop}" in err
  assert "damaged" not in err and not os.path.exists(workdir / workdir_lib.DAMAGED)
  _assert_close(_losses(workdir), preempted["reference"], range(1, stop + 4))


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_processes(preempted, sample_dir, tokenizer_path):
  """A run started in 1 process (so 1 data stream), resumed in 2: each reads the stream whole
  and keeps its rows, and the losses are those of the run continued in 1 process."""
  stop, root = preempted["stop"], preempted["root"]
  _finish(_start(root / "one", sample_dir, tokenizer_path, stop + 3, 1, 2))
  workdir = root / "one_then_two"
  _finish(_start(workdir, sample_dir, tokenizer_path, stop, 1, 2))
  assert checkpoint.steps_on_disk(str(workdir)) == [stop]
  errs = _finish(_start(workdir, sample_dir, tokenizer_path, stop + 3, 2, 2))
  assert "damaged" not in errs[0] + errs[1]
  for err in errs:
    assert ("2 processes read distinct rows of each batch, from 1 data stream(s) (data.streams "
            "is fixed at a run's first start): this process reads stream(s) [0] whole") in err
  _assert_close(_losses(workdir), _losses(root / "one"), range(1, stop + 4))

def test_a_changed_stream_count_starts_the_data_over_and_says_so(sample_dir, tokenizer_path,
                                                                  tmp_path, caplog):
  from helpers import tiny_config  # pylint: disable=import-outside-toplevel
  from nanollama_jax import train  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(sample_dir, tokenizer_path, steps=2, log_every=1)
  cfg.data.eval_files = ""
  cfg.optim.warmup_steps = 1
  train.train(cfg, str(tmp_path))
  cfg.train.steps, cfg.data.streams = 3, 2
  with caplog.at_level("WARNING"):
    train.train(cfg, str(tmp_path))
  assert ("data: data.streams=2, but the checkpoint holds the positions of 1 data streams: the "
          "data is split anew and starts over from its beginning") in caplog.text
  assert checkpoint.steps_on_disk(str(tmp_path)) == [2, 3]


@pytest.mark.slow
def test_every_process_of_a_run_stops_on_a_held_workdir(sample_dir, tokenizer_path, tmp_path):
  workdir = tmp_path / "held"
  workdir.mkdir()
  holder = {"host": "other-host", "pid": 4242, "run": "abc", "started": time.time(),
            "heartbeat": time.time(), "processes": 1}
  (workdir / workdir_lib.LEASE).write_text(json.dumps(holder))
  errs = _finish(_start(workdir, sample_dir, tokenizer_path, 4, 2, 2), codes=(2,))
  for err in errs:
    assert err.strip().splitlines()[-1].startswith(
      f"usage error: the workdir {workdir} is in use by another run (host other-host, pid 4242")
  assert os.listdir(workdir) == [workdir_lib.LEASE]

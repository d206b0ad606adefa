"""One run per workdir (lease.py), and profiles of training steps (profiling.py)."""

import glob
import gzip
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from helpers import tiny_config
from nanollama_jax import config, errors, lease, train
from nanollama_jax import workdir as workdir_lib


def _write_lease(workdir, **fields):
  now = time.time()
  holder = dict(host="other-host", pid=4242, run="abc", started=now - 60, heartbeat=now,
                processes=2)
  holder.update(fields)
  os.makedirs(workdir, exist_ok=True)
  # Whole or not at all, as runs write it: a heartbeat may read it at any moment.
  (workdir / "lease.tmp").write_text(json.dumps(holder))
  os.replace(workdir / "lease.tmp", workdir / workdir_lib.LEASE)


def test_a_held_workdir_is_refused_naming_the_holder_and_left_alone(tmp_path):
  _write_lease(tmp_path)
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(errors.WorkdirHeld, match=r"is in use by another run \(host other-host, pid "
                     r"4242, 2 process\(es\), started .*, last heartbeat 0s ago\): stop that run"):
    lease.acquire(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["lease.json", "metrics.jsonl"]
  assert json.loads((tmp_path / "lease.json").read_text())["pid"] == 4242


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog):
  _write_lease(tmp_path, heartbeat=time.time() - 3600)
  with caplog.at_level("WARNING"):
    held = lease.acquire(str(tmp_path))
  assert "taking over the workdir" in caplog.text and "its last heartbeat is 3600s old" in caplog.text
  now = json.loads((tmp_path / "lease.json").read_text())
  assert (now["host"], now["pid"], now["processes"]) == (socket.gethostname(), os.getpid(), 1)
  held.release()
  assert not os.path.exists(tmp_path / "lease.json")


def test_an_unreadable_lease_is_taken_over(tmp_path, caplog):
  (tmp_path / "lease.json").write_text('{"host": "x", "pi')  # torn
  with caplog.at_level("WARNING"):
    lease.acquire(str(tmp_path)).release()
  assert "the lease file cannot be read" in caplog.text


def test_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path, caplog):
  gone = subprocess.Popen(["true"])
  gone.wait()
  _write_lease(tmp_path, host=socket.gethostname(), pid=gone.pid)  # a fresh heartbeat
  with caplog.at_level("WARNING"):
    lease.acquire(str(tmp_path)).release()
  assert f"its process {gone.pid} no longer runs on this host" in caplog.text


@pytest.mark.parametrize("job, attempt, taken", [("77", "1", True), ("77", "0", False),
                                                 ("78", "1", False), (None, None, False)])
def test_a_requeued_slurm_job_takes_over_its_earlier_attempt_at_once(tmp_path, caplog,
                                                                      monkeypatch, job, attempt,
                                                                      taken):
  # Attempt 0 of job 77 was killed on another node; its heartbeat is fresh.
  _write_lease(tmp_path, slurm_job="77", slurm_attempt=0)
  for name, value in (("SLURM_JOB_ID", job), ("SLURM_RESTART_COUNT", attempt)):
    if value is None:
      monkeypatch.delenv(name, raising=False)
    else:
      monkeypatch.setenv(name, value)
  if not taken:
    with pytest.raises(errors.WorkdirHeld, match="is in use by another run"):
      lease.acquire(str(tmp_path))
    return
  with caplog.at_level("WARNING"):
    held = lease.acquire(str(tmp_path))
  assert ("it was attempt 0 of this SLURM job 77, which SLURM requeued (this is attempt 1)"
          in caplog.text)
  now = json.loads((tmp_path / "lease.json").read_text())
  assert (now["slurm_job"], now["slurm_attempt"]) == ("77", 1)
  held.release()


def test_a_lease_written_before_the_slurm_fields_is_read_whole(tmp_path):
  _write_lease(tmp_path)
  assert lease.read(str(tmp_path)).run == "abc"


def test_the_heartbeat_is_renewed_and_a_takeover_is_noticed(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
  held = lease.acquire(str(tmp_path))
  first = json.loads((tmp_path / "lease.json").read_text())["heartbeat"]
  deadline = time.time() + 10
  while json.loads((tmp_path / "lease.json").read_text())["heartbeat"] == first:
    assert time.time() < deadline
    time.sleep(0.02)
  # Another run takes over (this one's heartbeat had stalled); written until the heartbeat sees
  # it, as a beat that read the lease just before may write over it once.
  while held.lost is None:
    _write_lease(tmp_path)
    assert time.time() < deadline
    time.sleep(0.02)
  held.release()
  assert held.lost.host == "other-host"
  assert json.loads((tmp_path / "lease.json").read_text())["pid"] == 4242  # not removed


def test_a_run_whose_lease_was_taken_over_stops_without_saving(sample_dir, tokenizer_path,
                                                               tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
  cfg = tiny_config(sample_dir, tokenizer_path, steps=5000, log_every=1, ckpt_every=0)
  cfg.data.eval_files = ""
  stopped = threading.Event()

  def take_over():  # another run, once this one trains; it writes its lease until it holds it
    while not os.path.exists(tmp_path / "metrics.jsonl") or not (
        tmp_path / "metrics.jsonl").read_text().count("\n") >= 2:
      time.sleep(0.02)
    while not stopped.is_set():  # (a heartbeat that read the lease just before may rewrite it)
      _write_lease(tmp_path)
      time.sleep(0.05)
  thief = threading.Thread(target=take_over, daemon=True)
  thief.start()
  try:
    with pytest.raises(errors.TrainingError, match=r"another run took this workdir over after "
                       r"step \d+ \(host other-host, pid 4242.*stops without saving"):
      train.train(cfg, str(tmp_path))
  finally:
    stopped.set()
    thief.join()
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
  assert json.loads((tmp_path / "lease.json").read_text())["pid"] == 4242  # left to its holder


def test_a_refused_run_changes_nothing_in_a_new_workdir(sample_dir, tokenizer_path, tmp_path):
  cfg = tiny_config(sample_dir, tokenizer_path, steps=2)
  cfg.optim.warmup_steps = 1
  _write_lease(tmp_path / "run")
  with pytest.raises(errors.WorkdirHeld):
    train.train(cfg, str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == ["lease.json"]


def test_profile_steps_are_validated():
  cfg = config.get_default_config()
  for bad in ("3", "0:2", "4:4", "a:b"):
    cfg.train.profile_steps = bad
    with pytest.raises(errors.ConfigError, match="train.profile_steps"):
      config.validate(cfg, check_files=False)
  assert config.profile_steps("10:13") == (10, 13)


def test_a_profile_of_two_steps_is_written_and_names_the_train_step(sample_dir, tokenizer_path,
                                                                     tmp_path, caplog):
  cfg = tiny_config(sample_dir, tokenizer_path, steps=4, log_every=1,
                    profile_steps="2:4")
  cfg.data.eval_files = ""
  cfg.optim.warmup_steps = 1
  with caplog.at_level("INFO"):
    train.train(cfg, str(tmp_path))
  where = tmp_path / "profile" / "process_0"
  assert f"profile of steps 2..3 written to {where}" in caplog.text
  (xplane,) = glob.glob(str(where / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert b"train_step" in open(xplane, "rb").read()
  (perfetto,) = glob.glob(str(where / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
  events = json.loads(gzip.decompress(open(perfetto, "rb").read()))["traceEvents"]
  steps = sorted({e["args"]["step_num"] for e in events
                  if e.get("name") == "train" and "step_num" in e.get("args", {})})
  assert steps == ["2", "3"]  # the two traced steps, named as the logs number them
  assert not os.path.exists(tmp_path / "lease.json")  # released at the end

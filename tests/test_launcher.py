"""scripts/launch_tpu_pod.sh on a fake slice of two workers: tests/fake_gcloud/bin/gcloud runs each
ssh command with bash in one HOME per worker, where ~/nanollama_jax/.venv/bin/python is a fake
trainer (tests/fake_gcloud/trainer) that plays, start after start, the exits a test writes in
~/plan. Waits poll with a deadline; the restart pause is 0 s unless a test needs one."""

import os
import pathlib
import re
import select
import shutil
import signal
import subprocess
import time

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = str(TESTS.parent / "scripts" / "launch_tpu_pod.sh")
FAKE = TESTS / "fake_gcloud"
WORKERS = 2
TRAIN = ["train", "--restarts", "2", "my-tpu", "my-zone", "--"]


def wait_for(what, timeout=10.0):
  """Polls `what()` until it is true; fails after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while not what():
    assert time.monotonic() < deadline, f"gave up waiting for {what.__doc__ or what}"
    time.sleep(0.05)


class Pod:
  """The fake slice: one HOME per worker under `root`."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.env = dict(os.environ, PATH=f"{FAKE / 'bin'}:{os.environ['PATH']}", FAKE_TPU_ROOT=str(root),
                    FAKE_TPU_WORKERS=str(WORKERS), NANOLLAMA_RESTART_PAUSE="0",
                    NANOLLAMA_STOP_TIMEOUT="10")
    for w in range(WORKERS):
      venv = self.home(w) / "nanollama_jax" / ".venv" / "bin"
      venv.mkdir(parents=True)
      shutil.copy(FAKE / "trainer", venv / "python")

  def home(self, w: int) -> pathlib.Path:
    return self.root / f"worker{w}"

  def plan(self, *attempts: str, worker: int | None = None) -> None:
    """What the fake trainer does at each start (`EXIT STEPS TOTAL`), on one worker or all."""
    for w in range(WORKERS) if worker is None else [worker]:
      (self.home(w) / "plan").write_text("".join(a + "\n" for a in attempts))

  def launch(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], env=self.env, capture_output=True, text=True,
                          timeout=timeout, check=False)

  def run_dir(self, w: int) -> pathlib.Path:
    return (self.home(w) / "nanollama_runs" / "current").resolve()

  def read(self, w: int, name: str) -> str:
    path = self.run_dir(w) / name
    return path.read_text() if path.exists() else ""

  def log(self, w: int) -> str:
    return self.read(w, f"worker{w}.log")

  def decisions(self, w: int) -> list[str]:
    """The supervisor's lines in worker w's log, without their time stamps."""
    return re.findall(r"^\[launcher \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] (.*)$", self.log(w), re.M)

  def starts(self, w: int) -> list[str]:
    """The fake trainer's argument lists on worker w, one per start."""
    path = self.home(w) / "argv.log"
    return path.read_text().splitlines() if path.exists() else []

  def state(self, w: int) -> str:
    return self.read(w, "state").strip()

  def pid(self, w: int, name: str) -> int:
    return int(self.read(w, f"{name}.pid"))

  def settled(self, state: str, timeout: float = 10) -> None:
    """Waits until every worker's supervisor recorded a state starting with `state`."""
    def settled():
      return all(self.state(w).startswith(state) for w in range(WORKERS))
    settled.__doc__ = f"every worker's state to start with {state!r}"
    wait_for(settled, timeout)

  def kill_leftovers(self) -> None:
    """Ends the supervisors and trainers a failed test left running (only this pod's)."""
    for pid_file in self.root.glob("worker*/nanollama_runs/*/*.pid"):
      (pid_file.parent / "stop").touch()
      pid = int(pid_file.read_text())
      try:
        if str(self.root) in pathlib.Path(f"/proc/{pid}/cmdline").read_text() or \
            pid_file.name == "trainer.pid":
          os.kill(pid, signal.SIGTERM)
      except (FileNotFoundError, ProcessLookupError):
        pass


@pytest.fixture
def pod(tmp_path):
  fake = Pod(tmp_path)
  yield fake
  fake.kill_leftovers()


def test_train_returns_at_once_and_the_run_goes_on_detached(pod):
  pod.plan("wait 2 10", worker=0)
  pod.plan("wait 0 10", worker=1)  # like a worker other than 0, which logs no steps
  started = time.monotonic()
  out = pod.launch(*TRAIN, "--config", "configs/x.py", "--workdir", "gs://b/run 1", "--note=it's")
  assert out.returncode == 0, out.stderr
  assert time.monotonic() - started < 10  # gcloud did not wait for the run
  run = pod.run_dir(0).name
  for w in range(WORKERS):
    assert f"worker {w}: started run {run} (supervisor pid {pod.pid(w, 'supervisor')})" in out.stdout
  wait_for(lambda: "step 2/10" in pod.log(0) and pod.starts(1))
  for w in range(WORKERS):
    assert pod.starts(w) == ["[-m][nanollama_jax.train][--multihost][--config][configs/x.py]"
                             "[--workdir][gs://b/run 1][--note=it's]"]
    assert pod.run_dir(w) == pod.home(w) / "nanollama_runs" / run
    supervisor = pod.pid(w, "supervisor")
    assert os.getsid(supervisor) == supervisor  # a session of its own: setsid
    status = pathlib.Path(f"/proc/{supervisor}/status").read_text()
    sig_ign = int(re.search(r"^SigIgn:\s*(\w+)", status, re.M).group(1), 16)
    assert sig_ign & (1 << (signal.SIGHUP - 1))  # nohup
  assert pod.log(0).count("step ") == 2 and "step" not in pod.log(1).split("starts:")[1]

  out = pod.launch("status", "my-tpu", "my-zone")
  lines = sorted(out.stdout.splitlines())
  assert lines == [
      f"worker 0: run {run} running (supervisor pid {pod.pid(0, 'supervisor')}): "
      "attempt 1 of 3, last step 2/10",
      f"worker 1: run {run} running (supervisor pid {pod.pid(1, 'supervisor')}): "
      "attempt 1 of 3, no step logged"]


def test_a_second_train_is_refused_while_one_runs(pod):
  pod.plan("wait 1 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  run = pod.run_dir(0).name
  out = pod.launch(*TRAIN, "--config", "b.py")
  assert out.returncode == 1
  assert sorted(out.stdout.splitlines()) == [
      f"worker {w}: refused: run {run} is still running (supervisor pid "
      f"{pod.pid(w, 'supervisor')}); stop it first" for w in range(WORKERS)]
  for w in range(WORKERS):
    assert sorted(p.name for p in (pod.home(w) / "nanollama_runs").iterdir()) == [run, "current"]
    wait_for(lambda w=w: pod.starts(w))
    assert len(pod.starts(w)) == 1


def test_restarts_after_a_preemption_and_stops_when_finished(pod):
  pod.plan("143 3 10", "0 10 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  pod.settled("finished")
  for w in range(WORKERS):
    assert pod.decisions(w) == [
        "attempt 1 of 3 starts: .venv/bin/python -m nanollama_jax.train --multihost --config a.py",
        "attempt 1 exited 143: restart 1 of 2 in 0 s",
        "attempt 2 of 3 starts: .venv/bin/python -m nanollama_jax.train --multihost --config a.py",
        "attempt 2 exited 0: finished"]
    assert len(pod.starts(w)) == 2
  out = pod.launch("status", "my-tpu", "my-zone")
  assert f"worker 1: run {pod.run_dir(1).name} not running: finished (attempt 2 exited 0), " \
         "last step 10/10" in out.stdout.splitlines()


def test_gives_up_after_the_restarts_allowed(pod):
  pod.plan("1 1 10", "137 2 10", "1 3 10", "0 10 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  pod.settled("gave up")
  assert [d for d in pod.decisions(0) if "exited" in d] == [
      "attempt 1 exited 1: restart 1 of 2 in 0 s",
      "attempt 2 exited 137: restart 2 of 2 in 0 s",
      "attempt 3 exited 1 after 2 restarts: gave up"]
  assert pod.state(0) == "gave up (attempt 3 exited 1 after 2 restarts)"
  assert len(pod.starts(0)) == 3 and len(pod.starts(1)) == 3


def test_a_config_error_is_not_restarted(pod):
  pod.plan("2 0 10", "0 10 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  pod.settled("gave up")
  assert pod.decisions(1)[1:] == [
      "attempt 1 exited 2, a config or usage error that a restart would not fix: gave up"]
  assert len(pod.starts(0)) == 1 and len(pod.starts(1)) == 1


def test_stop_sends_sigterm_and_nothing_restarts(pod):
  pod.plan("wait 4 10", "0 10 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  wait_for(lambda: all(pod.read(w, "trainer.pid") for w in range(WORKERS)))
  trainers = [pod.pid(w, "trainer") for w in range(WORKERS)]
  run = pod.run_dir(0).name
  out = pod.launch("stop", "my-tpu", "my-zone")
  assert out.returncode == 0, out.stdout + out.stderr
  finals = [f"worker {w}: run {run} not running: stopped on request (attempt 1 exited 143), "
            "last step 4/10" for w in range(WORKERS)]
  assert sorted(out.stdout.splitlines()) == sorted(
      [f"worker {w}: SIGTERM sent to the trainer (pid {trainers[w]}), waiting up to 10 s for it "
       "to save" for w in range(WORKERS)] + finals)
  for w in range(WORKERS):
    assert "fake trainer: SIGTERM, saved" in pod.log(w)
    assert pod.decisions(w)[1:] == ["attempt 1 exited 143: stopped on request"]
    assert len(pod.starts(w)) == 1
  again = pod.launch("stop", "my-tpu", "my-zone")
  assert sorted(again.stdout.splitlines()) == finals

  # The next run gets a directory of its own and leaves the last one's log as it was.
  old_log = pod.log(0)
  wait_for(lambda: time.strftime("%Y%m%d-%H%M%S", time.gmtime()) != run)  # names are per second
  pod.plan("0 10 10")
  (pod.home(0) / "argv.log").unlink()
  (pod.home(1) / "argv.log").unlink()
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  pod.settled("finished")
  assert pod.run_dir(0).name != run
  assert (pod.home(0) / "nanollama_runs" / run / "worker0.log").read_text() == old_log


def test_stop_during_the_pause_before_a_restart(pod):
  pod.env["NANOLLAMA_RESTART_PAUSE"] = "30"
  pod.plan("1 2 10", "0 10 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  pod.settled("pausing before restart 1 of 2")
  started = time.monotonic()
  out = pod.launch("stop", "my-tpu", "my-zone")
  assert time.monotonic() - started < 10
  assert f"worker 1: run {pod.run_dir(1).name} not running: stopped on request (during the " \
         "pause after attempt 1 exited 1), last step 2/10" in out.stdout.splitlines()
  assert len(pod.starts(0)) == 1 and len(pod.starts(1)) == 1


def test_logs_prints_one_workers_log_and_follows_it(pod):
  pod.plan("wait 3 10", worker=0)
  pod.plan("wait 1 10", worker=1)
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  wait_for(lambda: "step 1/10" in pod.log(1) and "step 3/10" in pod.log(0))
  assert pod.launch("logs", "my-tpu", "my-zone", "--worker", "1").stdout == pod.log(1)
  assert pod.launch("logs", "my-tpu", "my-zone").stdout == pod.log(0)

  follow = subprocess.Popen([SCRIPT, "logs", "--follow", "my-tpu", "my-zone", "--worker=1"],
                            env=pod.env, stdout=subprocess.PIPE, start_new_session=True)
  try:
    seen = ""
    pod.launch("stop", "my-tpu", "my-zone")  # what the log gets next must come through
    deadline = time.monotonic() + 10
    while "stopped on request" not in seen:
      assert time.monotonic() < deadline, seen
      if select.select([follow.stdout], [], [], 0.1)[0]:
        seen += os.read(follow.stdout.fileno(), 1 << 16).decode()
    assert seen.startswith(pod.log(1).split("fake trainer")[0])
  finally:
    os.killpg(follow.pid, signal.SIGTERM)
    follow.wait(timeout=10)


def test_a_trainer_whose_supervisor_is_gone_still_counts(pod):
  out = pod.launch("status", "my-tpu", "my-zone")
  assert out.stdout.splitlines() == ["worker 0: no run launched here",
                                     "worker 1: no run launched here"]
  pod.plan("wait 2 10")
  assert pod.launch(*TRAIN, "--config", "a.py").returncode == 0
  wait_for(lambda: "step 2/10" in pod.log(0) and pod.read(0, "trainer.pid"))
  supervisor, trainer, run = pod.pid(0, "supervisor"), pod.pid(0, "trainer"), pod.run_dir(0).name
  os.kill(supervisor, signal.SIGKILL)  # as if killed by hand: its trainer still holds the TPU
  wait_for(lambda: not pathlib.Path(f"/proc/{supervisor}").exists())
  out = pod.launch("status", "my-tpu", "my-zone")
  assert out.stdout.splitlines()[0] == f"worker 0: run {run} running (trainer pid {trainer}, its " \
                                       "supervisor is gone): attempt 1 of 3, last step 2/10"
  out = pod.launch(*TRAIN, "--config", "b.py")
  assert f"worker 0: refused: run {run} is still running (trainer pid {trainer}, its supervisor " \
         "is gone); stop it first" in out.stdout.splitlines()
  out = pod.launch("stop", "my-tpu", "my-zone")
  assert f"worker 0: run {run} not running: the supervisor is gone (killed, or the VM restarted) " \
         "in attempt 1 of 3, last step 2/10" in out.stdout.splitlines()
  assert "fake trainer: SIGTERM, saved" in pod.log(0)


@pytest.mark.parametrize("args, error", [
    (["train", "--restarts", "x", "t", "z", "--", "a"], "--restarts takes a whole number, got 'x'"),
    (["train", "t", "z"], "train needs the trainer's arguments after --"),
    (["train", "t", "z", "--config", "a.py"],
     "train takes no option --config (trainer arguments go after --)"),
    (["status", "t", "z", "--follow"], "status takes no option --follow"),
    (["logs", "t", "z", "extra"], "unexpected argument extra"),
])
def test_usage_errors_name_the_argument(pod, args, error):
  out = pod.launch(*args)
  assert out.returncode == 2
  assert out.stderr.startswith(f"launch_tpu_pod.sh: {error}")
  assert not (pod.home(0) / "nanollama_runs").exists()


def test_help_is_the_header():
  out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=False)
  assert out.returncode == 2
  assert "scripts/launch_tpu_pod.sh train [--restarts N] TPU ZONE -- --config" in out.stderr
  assert "set -euo" not in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_scripts_pass_shellcheck():
  scripts = [SCRIPT, FAKE / "bin" / "gcloud", FAKE / "worker_bin" / "curl", FAKE / "trainer"]
  out = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stdout

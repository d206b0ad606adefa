"""scripts/launch_slurm.py: the batch script it writes, and jobs on a real single-host SLURM.

The cluster (tests/slurm_cluster.py) is Debian's slurm-wlm and munge, installed with apt where
missing; without them and without root the SLURM tests skip with that reason, unless
NANOLLAMA_REQUIRE_SLURM=1 (CI) makes that a failure. A 2-task job on CPU devices trains as one
2-process run; `scancel --signal=TERM` and then `scontrol requeue` preempt it (every task saves
one checkpoint and exits 143), it is requeued and resumes twice, and its losses equal an
uninterrupted job's; a second job on the same workdir is refused and not requeued; a job stopped
with `launch_slurm.py --stop` saves and is not requeued.
"""

import os
import re
import subprocess
import sys
import time

import pytest

import slurm_cluster
from helpers import REPO, run_script, tiny_run_args
from nanollama_jax import checkpoint, workdir as workdir_lib


def _print(*args):
  done = run_script("launch_slurm.py", "--dry-run", "--no-check", *args)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1].endswith(
    "tasks; the trainer's check: not checked (--no-check); nothing was submitted")
  return done.stdout.rsplit("\n", 2)[0]


def test_the_batch_script_runs_one_task_per_gpu_with_a_signal_before_the_limit(tmp_path):
  script = _print("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time",
                  "24:00:00", "--signal-seconds", "600", "--env", "NCCL_DEBUG=WARN", "--logs",
                  str(tmp_path / "logs"), "--", "--config", "configs/tinyllama_1b.py:a100x16",
                  "--workdir", "/shared/runs/tl")
  directives = re.findall(r"^#SBATCH (\S+)$", script, re.M)
  assert directives[:6] == ["--job-name=nanollama", "--nodes=2", "--ntasks-per-node=8",
                            "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00"]
  for d in ("--signal=TERM@600", "--requeue", "--open-mode=append",
            f"--output={tmp_path}/logs/job.log", f"--chdir={REPO}"):
    assert d in directives
  # No per-task GPU binding: JAX picks each task's GPU by SLURM_LOCALID among all it sees.
  assert not any("gpus-per-task" in d or "gpu-bind" in d for d in directives)
  assert "export NCCL_DEBUG=WARN" in script
  srun = next(line for line in script.splitlines() if line.startswith("srun "))
  assert srun.endswith(f"{sys.executable} -m nanollama_jax.train --multihost --config "
                       "configs/tinyllama_1b.py:a100x16 --workdir /shared/runs/tl")
  assert '--output="$LOGS/task%t.log"' in srun
  assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
  cpu = _print("--gpus-per-node", "2", "--cpu-devices", "4", "--", "--config", "c.py")
  assert "--gpus-per-node" not in cpu
  assert "export XLA_FLAGS=--xla_force_host_platform_device_count=4" in cpu


@pytest.mark.parametrize("args, message", [
  (["--nodes", "2"], "the trainer's arguments go after `--`"),
  (["--env", "NO_VALUE", "--", "--config", "c.py"], "--env 'NO_VALUE': expected NAME=VALUE"),
  (["--nodes", "0", "--", "--config", "c.py"], "--nodes and --gpus-per-node must be >= 1"),
])
def test_bad_launcher_arguments_are_refused(args, message):
  done = run_script("launch_slurm.py", *args)
  assert done.returncode == 2 and message in done.stderr


def test_the_dry_run_checks_the_config_with_the_trainer(tmp_path):
  done = run_script("launch_slurm.py", "--dry-run", "--nodes", "2", "--", "--config",
                    "configs/tinyllama_1b.py:a100x16", "--workdir", str(tmp_path / "w"))
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1].startswith(
    "dry run: 2 node(s) x 8 tasks; the trainer's check: the config is valid: 1,100,048,384 "
    "parameters")
  assert not (tmp_path / "w").exists()


def test_a_config_error_is_caught_before_the_job_is_queued(tmp_path):
  done = run_script("launch_slurm.py", "--logs", str(tmp_path / "logs"), "--",
                    "--config", "configs/tinystories_cpu.py", "--workdir", str(tmp_path / "w"),
                    "--config.model.dimm=3")
  assert done.returncode == 2, done.stderr
  assert "dimm" in done.stderr and "nothing submitted" in done.stderr
  assert not (tmp_path / "logs").exists()


# --- Jobs on a real SLURM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  reason = slurm_cluster.install()
  if reason:
    if os.environ.get("NANOLLAMA_REQUIRE_SLURM") == "1":
      pytest.fail(reason)
    pytest.skip(reason)
  c = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm")))
  try:
    c.start()
    yield c
  finally:
    c.stop()


def _submit(cluster, root, sample_dir, tokenizer_path, steps, workdir=None):
  """The launcher's job of 2 tasks x 2 CPU devices training helpers.tiny_run_args: a tiny
  model at a constant learning rate, every step logged, a checkpoint only when stopped."""
  args = ["--gpus-per-node", "2", "--cpu-devices", "2", "--logs", str(root / "logs"),
          "--job-name", root.name, "--",
          *tiny_run_args(workdir or root / "workdir", sample_dir, tokenizer_path, steps)]
  done = run_script("launch_slurm.py", *args, cwd=str(root), env=cluster.env)
  assert done.returncode == 0, done.stderr
  job = re.search(r"submitted job (\d+)", done.stdout).group(1)
  assert (root / "logs" / "job_id").read_text().strip() == job
  return job


def _losses(workdir):
  if not os.path.exists(workdir / "metrics.jsonl"):
    return {}
  return {r["step"]: r["loss"] for r in workdir_lib.read_metrics(str(workdir)) if "loss" in r}


def _until(condition, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _read(path):
  return path.read_text() if path.exists() else ""


def _exited(log, status):
  """The tasks srun reports as having exited with `status` ('tasks 0-1: ...' when they end
  together, one line per task when they do not)."""
  tasks = set()
  for spec in re.findall(rf"tasks? ([\d,\-]+): Exited with exit code {status}\b", log):
    for part in spec.split(","):
      first, _, last = part.partition("-")
      tasks.update(range(int(first), int(last or first) + 1))
  return tasks


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_with_the_uninterrupted_losses(
    cluster, sample_dir, tokenizer_path, tmp_path):
  steps = 200
  run = tmp_path / "run"
  run.mkdir()
  job = _submit(cluster, run, sample_dir, tokenizer_path, steps)
  workdir, logs = run / "workdir", run / "logs"
  _until(lambda: max(_losses(workdir), default=0) >= 3, "the job's step 3")
  assert cluster.job(job)["JobState"] == "RUNNING"

  # A second job on the same workdir: refused by the lease, and not requeued.
  second = tmp_path / "second"
  second.mkdir()
  refused = _submit(cluster, second, sample_dir, tokenizer_path, steps, workdir=workdir)
  info = cluster.wait(refused, ("COMPLETED", "FAILED"))
  assert (info["ExitCode"], info["Restarts"]) == ("2:0", "0")
  assert "is in use by another run" in _read(second / "logs" / "task0.log")
  assert "exit 2: a config, data or usage error, or the workdir is in use" in _read(
    second / "logs" / "job.log")

  # The uninterrupted reference, beside it.
  ref = tmp_path / "reference"
  ref.mkdir()
  reference_job = _submit(cluster, ref, sample_dir, tokenizer_path, steps)

  # Preempted by a signal: every task saves and exits 143; the batch script requeues the job.
  cluster.run("scancel", "--signal=TERM", job)
  _until(lambda: "exit 143: stopped by SIGTERM after saving a checkpoint: requeued" in _read(
    logs / "job.log"), "the first preemption")
  assert _exited(_read(logs / "job.log"), 143) == {0, 1}
  (first,) = checkpoint.steps_on_disk(str(workdir))
  for task in (0, 1):
    assert (f"SIGTERM received: stopped after step {first} with a checkpoint"
            in _read(logs / f"task{task}.log"))

  # Requeued by the scheduler while it runs again (as a preemption with PreemptMode=REQUEUE
  # does): SLURM signals the tasks itself, and they save again.
  _until(lambda: max(_losses(workdir), default=0) >= first + 3, "the resumed job's steps")
  assert cluster.job(job)["Restarts"] == "1"
  cluster.run("scontrol", "requeue", job)
  _until(lambda: len(checkpoint.steps_on_disk(str(workdir))) == 2, "the second checkpoint")
  second_stop = checkpoint.steps_on_disk(str(workdir))[-1]
  assert second_stop > first

  info = cluster.wait(job, ("COMPLETED", "FAILED"), timeout=600)
  assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2")
  log = _read(logs / "job.log")
  assert f"job {job} attempt 2: exit 0: finished" in log
  task0 = _read(logs / "task0.log")
  for stop in (first, second_stop):
    assert f"resuming from {workdir / 'checkpoints'}/{stop}" in task0
  assert "Traceback" not in task0 + _read(logs / "task1.log")

  # Stopped by hand with the launcher: a checkpoint, and no requeue.
  stopped = tmp_path / "stopped"
  stopped.mkdir()
  stopped_job = _submit(cluster, stopped, sample_dir, tokenizer_path, steps)
  _until(lambda: max(_losses(stopped / "workdir"), default=0) >= 2, "the stopped job's steps")
  done = run_script("launch_slurm.py", "--stop", str(stopped / "logs"), env=cluster.env)
  assert done.returncode == 0, done.stderr
  info = cluster.wait(stopped_job, ("COMPLETED", "FAILED"))
  assert (info["ExitCode"], info["Restarts"]) == ("143:0", "0")
  assert "exit 143: stopped by --stop after saving a checkpoint: not requeued" in _read(
    stopped / "logs" / "job.log")
  assert len(checkpoint.steps_on_disk(str(stopped / "workdir"))) == 1

  info = cluster.wait(reference_job, ("COMPLETED", "FAILED"), timeout=600)
  assert info["ExitCode"] == "0:0"
  got, want = _losses(workdir), _losses(ref / "workdir")
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  diff = max(abs(got[s] - want[s]) for s in want)
  print(f"stopped after steps {first} and {second_stop}; max |loss difference| over "
        f"{steps} steps: {diff:.3g}")
  assert diff < 1e-4

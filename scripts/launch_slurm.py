"""Trains on a SLURM cluster: writes a batch script for N nodes x G GPUs and submits it.

  python scripts/launch_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      -- --config configs/tinyllama_1b.py:a100x16 --workdir /shared/runs/tinyllama

Run it on the login node, from a checkout and environment that every node sees (a shared
filesystem): the job starts `PYTHON -m nanollama_jax.train --multihost ARGS` with the Python that
ran this script, one task per GPU, in the directory it was submitted from.

Layout: one process per GPU (`--ntasks-per-node=G --gpus-per-node=G`). JAX's SLURM support reads
the job's environment (SLURM_NTASKS, SLURM_PROCID, the first node of SLURM_STEP_NODELIST as the
coordinator, a port from SLURM_JOB_ID) and gives each task the GPU numbered by its SLURM_LOCALID,
so every task sees the node's GPUs and picks its own: no per-task binding is asked for, which
would renumber the GPU a task sees as 0.

Preemption and requeue: `--signal=TERM@SECONDS` has SLURM send SIGTERM to every task that long
before the time limit; the trainer finishes its step, saves a checkpoint and exits 143. The job
is submitted with `--requeue`, and its batch script acts on the trainer's exit status: 0, done;
2 (a config, data or usage error, or the workdir held by another run), given up; 143 (SIGTERM:
preempted, or the time limit near; a checkpoint saved), requeued at once to resume from it; 130
(SIGINT, after saving: stopped by hand), not requeued; anything else (1, a crash; 75, a network or bucket failure), requeued while fewer than --restarts such
failures have happened. A preemption by the scheduler itself (PreemptMode=REQUEUE, or
`scontrol requeue JOB`) signals the tasks the same way and requeues the job without the script.

Logs: LOGS/job.log (this launcher's lines per attempt and srun's), LOGS/task<N>.log (task N's
output, appended to across attempts; task 0 is the process that logs the steps) and
LOGS/job.sbatch, the script submitted. LOGS defaults to slurm_runs/<job name>-<UTC time>/.
Watch with `squeue -j JOB` and `tail -f LOGS/task0.log`. `launch_slurm.py --stop LOGS` stops the
run with a checkpoint and no requeue (submit the same command again to resume it);
`scancel --signal=TERM JOB` saves and requeues, as a preemption does; `scancel JOB` ends it
without saving.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys

# The trainer's exit statuses (nanollama_jax/cli.py): what the batch script does with each.
_DONE, _GIVE_UP, _STOPPED, _PREEMPTED = (0,), (2,), (130,), (143,)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  if "--" in argv:
    split = argv.index("--")
    argv, train_args = argv[:split], argv[split + 1:]
  else:
    train_args = []
  parser = argparse.ArgumentParser(
    description="Writes and submits a SLURM batch job that trains with one task per GPU: "
                "`python scripts/launch_slurm.py [OPTIONS] -- TRAIN ARGS`.")
  parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
  parser.add_argument("--gpus-per-node", type=int, default=8,
                      help="GPUs per node, one task each (default 8)")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="instead of GPUs: CPU nodes, tasks of this many JAX CPU devices each "
                           "(--gpus-per-node then counts tasks per node; for trying the launcher "
                           "on a CPU partition)")
  parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
  parser.add_argument("--account", help="SLURM account to charge")
  parser.add_argument("--qos", help="SLURM quality of service")
  parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
  parser.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: SLURM's)")
  parser.add_argument("--mem", help="memory per node, e.g. 0 for all of it (default: SLURM's)")
  parser.add_argument("--signal-seconds", type=int, default=300,
                      help="SIGTERM this long before the time limit, for the checkpoint "
                           "(default 300)")
  parser.add_argument("--restarts", type=int, default=3,
                      help="requeues after failures other than a signal (default 3)")
  parser.add_argument("--job-name", default="nanollama", help="job name (default nanollama)")
  parser.add_argument("--logs", help="directory for the job's logs and batch script, on a "
                                     "shared filesystem (default slurm_runs/NAME-TIME)")
  parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="an environment variable for every task (repeatable), e.g. "
                           "NCCL_SOCKET_IFNAME=ib0")
  parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                      help="one more sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
  parser.add_argument("--python", default=sys.executable,
                      help="the Python of the environment the nodes run (default: this one)")
  parser.add_argument("--no-check", action="store_true",
                      help="submit without first checking the config with the trainer's "
                           "--dry_run here")
  parser.add_argument("--stop", metavar="LOGS",
                      help="stop the job these logs belong to: every task saves a checkpoint "
                           "and exits, and the job is not requeued")
  parser.add_argument("--dry-run", action="store_true",
                      help="check the config, print the batch script, and submit nothing")
  args = parser.parse_args(argv)
  if args.stop:
    return args, train_args
  if not train_args:
    parser.error("the trainer's arguments go after `--` (at least --config and --workdir)")
  if args.nodes < 1 or args.gpus_per_node < 1 or args.cpu_devices < 0 or args.restarts < 0:
    parser.error("--nodes and --gpus-per-node must be >= 1, --cpu-devices and --restarts >= 0")
  for item in args.env:
    if "=" not in item or not item.split("=", 1)[0].isidentifier():
      parser.error(f"--env {item!r}: expected NAME=VALUE")
  return args, train_args


def batch_script(args: argparse.Namespace, train_args: list[str], logs: str) -> str:
  """The sbatch file: resources, signal and requeue, then srun and the decision on its exit."""
  tasks = args.gpus_per_node
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                f"--ntasks-per-node={tasks}"]
  if not args.cpu_devices:
    directives.append(f"--gpus-per-node={args.gpus_per_node}")
  for flag, value in (("partition", args.partition), ("account", args.account),
                      ("qos", args.qos), ("time", args.time),
                      ("cpus-per-task", args.cpus_per_task), ("mem", args.mem)):
    if value is not None:
      directives.append(f"--{flag}={value}")
  directives += [f"--signal=TERM@{args.signal_seconds}", "--requeue", "--open-mode=append",
                 f"--output={logs}/job.log", f"--chdir={os.getcwd()}", *args.sbatch_arg]
  env = list(args.env)
  if args.cpu_devices:
    env += ["JAX_PLATFORMS=cpu",
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.cpu_devices}"]
  exports = "".join(f"export {shlex.quote(item)}\n" for item in env)
  command = shlex.join([args.python, "-m", "nanollama_jax.train", "--multihost", *train_args])
  lines = ["#!/usr/bin/env bash", *(f"#SBATCH {d}" for d in directives)]
  return "\n".join(lines) + f"""
# Written by scripts/launch_slurm.py: one task per {'task slot' if args.cpu_devices else 'GPU'}, \
each a process of one JAX run.
set -u
LOGS={shlex.quote(logs)}
RESTARTS={args.restarts}
attempt=${{SLURM_RESTART_COUNT:-0}}
say() {{ echo "[launcher $(date -u +%Y-%m-%dT%H:%M:%SZ)] job $SLURM_JOB_ID attempt $attempt: $*"; }}
{exports}say "starting $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"
# --wait: once one task has ended, the others get 120 s to end too (a crashed process leaves the
# others waiting in a collective); a preempted run's tasks all save and end within it.
srun --wait=120 --output="$LOGS/task%t.log" --open-mode=append {command}
status=$?
failures=$(cat "$LOGS/failures" 2>/dev/null || echo 0)
case $status in
  {"|".join(map(str, _DONE))}) say "exit $status: finished" ;;
  {"|".join(map(str, _GIVE_UP))}) say "exit $status: a config, data or usage error, or the \
workdir is in use (see $LOGS/task0.log): not requeued" ;;
  {"|".join(map(str, _STOPPED))}) say "exit $status: stopped by SIGINT after saving a checkpoint: \
not requeued" ;;
  {"|".join(map(str, _PREEMPTED))}) if [ -e "$LOGS/stop" ]; then
       say "exit $status: stopped by --stop after saving a checkpoint: not requeued"
     else
       say "exit $status: stopped by SIGTERM after saving a checkpoint: requeued"
       scontrol requeue "$SLURM_JOB_ID"
     fi ;;
  *) if [ "$failures" -lt "$RESTARTS" ]; then
       echo $((failures + 1)) > "$LOGS/failures"
       say "exit $status: failed ($((failures + 1)) of $RESTARTS restarts): requeued"
       scontrol requeue "$SLURM_JOB_ID"
     else
       say "exit $status: failed, and $RESTARTS restarts are used: not requeued"
     fi ;;
esac
exit $status
"""


def stop(logs: str) -> int:
  """Marks the job of `logs` stopped, then sends its tasks SIGTERM (they save and exit 143)."""
  try:
    with open(os.path.join(logs, "job_id"), encoding="utf-8") as f:
      job = f.read().strip()
  except FileNotFoundError:
    print(f"launch_slurm.py: {logs} holds no job_id: not a directory this launcher submitted "
          "a job from", file=sys.stderr)
    return 2
  open(os.path.join(logs, "stop"), "w", encoding="utf-8").close()
  cancel = subprocess.run(["scancel", "--signal=TERM", job], check=False, capture_output=True,
                          text=True)
  if cancel.returncode != 0:
    print(f"launch_slurm.py: scancel --signal=TERM {job}: {cancel.stderr.strip()}",
          file=sys.stderr)
    return 1
  print(f"job {job}: SIGTERM sent; its tasks save a checkpoint and exit, and it is not requeued")
  return 0


def check(python: str, train_args: list[str]) -> str | None:
  """The trainer's --dry_run on these arguments, here: its summary line, or None (said) when the
  config, its files or an override is wrong."""
  done = subprocess.run([python, "-m", "nanollama_jax.train", "--dry_run", *train_args],
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False,
                        capture_output=True, text=True)
  if done.returncode != 0:
    print(done.stderr.rstrip().splitlines()[-1] if done.stderr.strip() else
          f"the trainer's --dry_run exited {done.returncode}", file=sys.stderr)
    print("launch_slurm.py: nothing submitted (--no-check skips this check)", file=sys.stderr)
    return None
  return done.stdout.strip().splitlines()[-1].removeprefix("dry run: ")


def main(argv: list[str]) -> int:
  args, train_args = parse_args(argv)
  if args.stop:
    return stop(args.stop)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  logs = os.path.abspath(args.logs or os.path.join("slurm_runs", f"{args.job_name}-{stamp}"))
  script = batch_script(args, train_args, logs)
  # The config, its files and the overrides, checked here before the job waits in the queue.
  summary = "not checked (--no-check)" if args.no_check else check(args.python, train_args)
  if summary is None:
    return 2
  if args.dry_run:
    print(script, end="")
    print(f"dry run: {args.nodes} node(s) x {args.gpus_per_node} tasks; the trainer's check: "
          f"{summary}; nothing was submitted")
    return 0
  os.makedirs(logs, exist_ok=True)
  path = os.path.join(logs, "job.sbatch")
  with open(path, "w", encoding="utf-8") as f:
    f.write(script)
  try:
    submitted = subprocess.run(["sbatch", "--parsable", path], check=False, capture_output=True,
                               text=True)
  except FileNotFoundError:
    print("launch_slurm.py: sbatch not found: run this on a SLURM login node "
          f"(the batch script is {path})", file=sys.stderr)
    return 2
  if submitted.returncode != 0:
    print(f"launch_slurm.py: sbatch refused {path}: {submitted.stderr.strip()}", file=sys.stderr)
    return 2
  job = submitted.stdout.strip().split(";")[0]
  with open(os.path.join(logs, "job_id"), "w", encoding="utf-8") as f:
    f.write(job + "\n")
  print(f"submitted job {job}: {args.nodes} node(s) x {args.gpus_per_node} tasks; logs in {logs}")
  print(f"  squeue -j {job}            # its state")
  print(f"  tail -f {logs}/task0.log   # the steps")
  print(f"  python scripts/launch_slurm.py --stop {logs}   # save a checkpoint and stop")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

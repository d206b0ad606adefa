"""A real single-host SLURM cluster for tests: munged, slurmctld and slurmd from Debian's
`slurm-wlm` and `munge`, installed with apt where missing (as root), configured and run entirely
inside one directory (its own munge key and socket, state, spool and logs, free ports), and
stopped at the end.

One node (this host) offers 4 CPU slots whatever the machine has (`config_overrides`), so that
two 2-task jobs can run side by side; the tasks fake their JAX devices on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")


def _sbin(name: str) -> str | None:
  return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing() -> list[str]:
  return [p for p in _PROGRAMS if _sbin(p) is None]


def install() -> str | None:
  """Installs slurm-wlm and munge with apt where they are missing; the reason when it cannot."""
  if not missing():
    return None
  if os.geteuid() != 0:
    return f"SLURM is not installed ({', '.join(missing())} missing) and this is not root"
  if shutil.which("apt-get") is None:
    return "SLURM is not installed and there is no apt-get to install it"
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  for command in (["apt-get", "update", "-qq"],
                  ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 and command[1] == "install":
      return f"apt-get install slurm-wlm munge failed: {done.stderr.strip()[-500:]}"
  return f"apt-get installed SLURM, but {', '.join(missing())} are still missing" \
    if missing() else None


def _free_ports(n: int) -> list[int]:
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]


class Cluster:
  """The running cluster: `env` is the environment its commands (sbatch, squeue...) need."""

  def __init__(self, root: str):
    self.root = root
    self.conf = os.path.join(root, "slurm.conf")
    self.env = dict(os.environ, SLURM_CONF=self.conf)
    self.node = socket.gethostname().split(".")[0]
    self._pids: list[str] = []

  def start(self) -> None:
    root = self.root
    for d in ("munge", "state", "spool", "log"):
      os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "munge"), 0o755)
    key = os.path.join(root, "munge", "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(root, "munge", "socket")
    munge_pid = os.path.join(root, "munge", "munged.pid")
    subprocess.run([_sbin("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={munge_pid}", f"--log-file={root}/log/munged.log",
                    f"--seed-file={root}/munge/seed"], check=True, capture_output=True)
    self._pids.append(munge_pid)
    ctld_port, slurmd_port = _free_ports(2)
    # cred_expire: how long a requeued job waits before it may start again (120 s by default).
    with open(self.conf, "w", encoding="utf-8") as f:
      f.write(f"""ClusterName=nanollama-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
MinJobAge=3600
JobRequeue=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    for daemon in ("slurmctld", "slurmd"):
      subprocess.run([_sbin(daemon), "-f", self.conf], check=True, capture_output=True,
                     env=self.env)
      self._pids.append(os.path.join(root, f"{daemon}.pid"))
    deadline = time.time() + 60
    while True:
      state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
      if state == "idle":
        return
      if time.time() > deadline:
        raise RuntimeError(f"the test cluster's node is {state!r} after 60 s; logs in {root}/log")
      time.sleep(0.5)

  def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check,
                          timeout=60)

  def job(self, job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode...)."""
    out = self.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)

  def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
      info = self.job(job_id)
      if info.get("JobState") in states:
        return info
      if time.time() > deadline:
        raise TimeoutError(f"job {job_id} is {info.get('JobState')}, not {states}, after "
                           f"{timeout:.0f} s")
      time.sleep(0.5)

  def stop(self) -> None:
    self.run("scancel", "--full", "--user=root", check=False)
    for pid_file in reversed(self._pids):
      try:
        with open(pid_file, encoding="utf-8") as f:
          pid = int(f.read().strip())
        os.kill(pid, signal.SIGTERM)
      except (OSError, ValueError):
        continue
      for _ in range(100):
        try:
          os.kill(pid, 0)
        except OSError:
          break
        time.sleep(0.1)

#!/usr/bin/env bash
# Installs, starts, watches and stops training on every worker of a Cloud TPU VM slice
# (v4-32, v5p-64, ...).
#
#   scripts/launch_tpu_pod.sh setup TPU ZONE [REPO_URL]
#       clones the repository (default: this checkout's origin) into ~/nanollama_jax on every
#       worker and installs it with the TPU build of jax
#   scripts/launch_tpu_pod.sh train [--restarts N] TPU ZONE -- --config configs/llama3_2_1b.py \
#       --workdir gs://bucket/runs/l1b [--config.mesh.fsdp=-1 ...]
#       starts `python -m nanollama_jax.train --multihost ARGS` on every worker, detached from
#       ssh, under a supervisor that restarts it up to N times (default 3); returns at once.
#       Refused while a run this script started is still running on a worker.
#   scripts/launch_tpu_pod.sh status TPU ZONE
#       per worker: running or not, the attempt, the last `step N/M` in its log
#   scripts/launch_tpu_pod.sh logs TPU ZONE [--worker N] [--follow]
#       prints worker N's log (default 0, the process that logs the steps); --follow keeps on
#   scripts/launch_tpu_pod.sh stop TPU ZONE
#       SIGTERM to every trainer (it saves a checkpoint and exits 143), no restart after it;
#       waits up to $NANOLLAMA_STOP_TIMEOUT seconds (default 600) for the workers to finish
#
# The launcher's options may stand anywhere between the action and `--`; what follows `--`
# goes to the trainer. Restarts: a trainer that exits 0 has finished; one that exits 2 (a
# config, data or usage error) is not restarted; any other exit (143/130: stopped by
# SIGTERM/SIGINT after saving, 75: a network or bucket failure, 1: failed, a crash) is
# restarted after $NANOLLAMA_RESTART_PAUSE seconds (default 30) and resumes from the newest
# checkpoint, until N restarts are used.
#
# Each launch is a run named by its start time (UTC, 20250131-142500); on every worker it lives
# in ~/nanollama_runs/RUN/: worker<ID>.log (the launcher's lines, `[launcher ...]`, and the
# trainer's output), the supervisor's pid, its state and a copy of this script.
# ~/nanollama_runs/current links to the newest run; older runs are kept.
#
# The workdir must be a directory every worker sees (a gs:// bucket, an NFS or Filestore mount,
# or a gcsfuse mount of a bucket). Set CLOUDSDK_CORE_PROJECT or `gcloud config set project` first.
set -euo pipefail

RUNS=$HOME/nanollama_runs

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
usage_error() { echo "launch_tpu_pod.sh: $1 (see --help)" >&2; exit 2; }
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# --- On each worker: the actions below run there, in a copy of this script sent over ssh. ---

worker_id() {
  # The same number JAX's --multihost reads for the process index (jax's cloud_tpu_cluster),
  # so worker 0 is process 0, the one that logs the steps.
  curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || { echo "no agent-worker-number from the metadata server: not a Cloud TPU VM?" >&2; exit 1; }
}

current() {  # the newest run's directory, as its supervisor's command names it
  local run
  run=$(readlink "$RUNS/current" 2>/dev/null) && echo "$RUNS/$run"
}

pid_of() {  # RUN_DIR supervisor|trainer: its pid, if that process still runs (a pid file left
  # behind by a VM restart may name another process now: its command line must match)
  local pid pattern=" $1 "
  [[ $2 == trainer ]] && pattern=" -m nanollama_jax.train "
  pid=$(cat "$1/$2.pid" 2>/dev/null) || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$pattern" && echo "$pid"
}

alive() {  # RUN_DIR: whether its supervisor or its trainer (holding the TPU) still runs
  pid_of "$1" supervisor >/dev/null || pid_of "$1" trainer >/dev/null
}

who() {  # RUN_DIR: the pids that keep it running
  local pid
  if pid=$(pid_of "$1" supervisor); then
    echo "supervisor pid $pid"
  elif pid=$(pid_of "$1" trainer); then
    echo "trainer pid $pid, its supervisor is gone"
  fi
}

state() {  # RUN_DIR: what its supervisor last recorded, and the last `step N/M` of its log
  local step
  step=$(grep -ho 'step [0-9]*/[0-9]*' "$1"/worker*.log /dev/null | tail -n 1) || true
  echo "$(cat "$1/state" 2>/dev/null || echo "no state recorded")," \
    "${step:+last }${step:-no step logged}"
}

ready() {  # ID: refuses (one line, exit 1) while a run still runs here, or before setup
  local dir
  for dir in "$RUNS"/*/; do
    dir=${dir%/}
    [[ -L $dir ]] && continue
    if alive "$dir"; then
      echo "worker $1: refused: run ${dir##*/} is still running ($(who "$dir")); stop it first"
      exit 1
    fi
  done
  [[ -x $HOME/nanollama_jax/.venv/bin/python ]] \
    || { echo "worker $1: refused: ~/nanollama_jax/.venv is missing: run setup first"; exit 1; }
}

describe() {  # ID: the line about this worker's newest run
  local dir
  dir=$(current) || { echo "worker $1: no run launched here"; return; }
  if alive "$dir"; then
    echo "worker $1: run ${dir##*/} running ($(who "$dir")): $(state "$dir")"
  elif grep -q '^attempt\|^pausing' "$dir/state" 2>/dev/null; then
    echo "worker $1: run ${dir##*/} not running: the supervisor is gone (killed, or the VM" \
      "restarted) in $(state "$dir")"
  else
    echo "worker $1: run ${dir##*/} not running: $(state "$dir")"
  fi
}

worker_check() {
  local id
  id=$(worker_id)
  ready "$id"
}

worker_status() {
  local id
  id=$(worker_id)
  describe "$id"
}

worker_start() {  # RUN RESTARTS PAUSE -- ARGS...
  local id run=$1 restarts=$2 pause=$3 dir log i
  shift 4
  id=$(worker_id)
  ready "$id"
  dir=$RUNS/$run log=$RUNS/$run/worker$id.log
  mkdir -p "$RUNS"
  mkdir "$dir" || { echo "worker $id: refused: $dir exists already"; exit 1; }
  cp "$0" "$dir/launch_tpu_pod.sh"
  ln -sfn "$run" "$RUNS/current"
  # A session of its own (setsid) with SIGHUP ignored (nohup) and no descriptor of the ssh
  # session open: ssh returns at once, and neither its end nor the launching machine's matters.
  # (A systemd-logind set to KillUserProcesses=yes would still end it with the session; Ubuntu,
  # the TPU VM image, leaves that off.)
  setsid nohup bash "$dir/launch_tpu_pod.sh" supervise "$dir" "$restarts" "$pause" -- "$@" \
    </dev/null >>"$log" 2>&1 &
  for ((i = 0; i < 50; i++)); do
    [[ -s $dir/supervisor.pid ]] && break
    sleep 0.2
  done
  [[ -s $dir/supervisor.pid ]] \
    || { echo "worker $id: the supervisor did not start: see $log"; exit 1; }
  echo "worker $id: started run $run (supervisor pid $(cat "$dir/supervisor.pid")), log $log"
}

say() { echo "[launcher $(stamp)] $*"; }

supervise() {  # RUN_DIR RESTARTS PAUSE -- ARGS...
  # Restarts the trainer on this worker alone, yet the workers of a multi-host run restart
  # together: a preemption stops every process at the same step (JAX's preemption sync point)
  # and each exits 143; a lost worker makes the others' collectives fail, so they exit nonzero
  # too. Each supervisor then starts its trainer again after the same pause, and the new
  # processes meet in jax.distributed's initialisation, which waits for all of them.
  local dir=$1 restarts=$2 pause=$3 attempt=0 rc i
  shift 4
  echo $$ >"$dir/supervisor.pid"
  # A SIGTERM to the supervisor (the VM shutting down: systemd signals the trainer itself too)
  # only means: no restart. `stop` leaves the same marker and signals the trainer once.
  trap 'touch "$dir/stop"; interrupted=1' TERM
  cd "$HOME/nanollama_jax"
  while true; do
    attempt=$((attempt + 1))
    echo "attempt $attempt of $((restarts + 1))" >"$dir/state"
    say "attempt $attempt of $((restarts + 1)) starts:" \
      ".venv/bin/python -m nanollama_jax.train --multihost$(printf ' %q' "$@")"
    rc=0
    run_trainer "$dir" "$@" || rc=$?
    if [[ $rc == 0 ]]; then
      finish "$dir" "finished" "attempt $attempt exited 0"
    elif [[ -e $dir/stop ]]; then
      finish "$dir" "stopped on request" "attempt $attempt exited $rc"
    elif [[ $rc == 2 ]]; then
      finish "$dir" "gave up" "attempt $attempt exited 2, a config or usage error that a" \
        "restart would not fix"
    elif ((attempt > restarts)); then
      finish "$dir" "gave up" "attempt $attempt exited $rc after $restarts restarts"
    fi
    say "attempt $attempt exited $rc: restart $attempt of $restarts in $pause s"
    echo "pausing before restart $attempt of $restarts (attempt $attempt exited $rc)" \
      >"$dir/state"
    for ((i = 0; i < pause * 5; i++)); do
      [[ -e $dir/stop ]] && break
      sleep 0.2
    done
    if [[ -e $dir/stop ]]; then
      finish "$dir" "stopped on request" "during the pause after attempt $attempt exited $rc"
    fi
  done
}

finish() {  # RUN_DIR DECISION WHY...: logs and records the decision, ends the supervisor
  local dir=$1 decision=$2
  shift 2
  say "$*: $decision"
  echo "$decision ($*)" >"$dir/state"
  exit 0
}

run_trainer() {  # RUN_DIR ARGS...: the trainer's exit status, even when a signal interrupts wait
  local dir=$1 pid rc
  shift
  .venv/bin/python -m nanollama_jax.train --multihost "$@" &
  pid=$!
  echo "$pid" >"$dir/trainer.pid"
  while true; do
    interrupted=0 rc=0
    wait "$pid" || rc=$?
    if [[ $interrupted == 0 ]] || ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
  done
  rm -f "$dir/trainer.pid"
  return "$rc"
}

worker_logs() {  # FOLLOW (0 or 1)
  local id dir
  id=$(worker_id)
  dir=$(current) || { echo "worker $id: no run launched here"; exit 1; }
  if [[ $1 == 1 ]]; then
    exec tail -n +1 -F "$dir/worker$id.log"
  fi
  cat "$dir/worker$id.log"
}

worker_stop() {  # TIMEOUT_S
  local id dir pid i signalled=
  id=$(worker_id)
  if ! dir=$(current) || ! alive "$dir"; then
    describe "$id"
    return
  fi
  touch "$dir/stop"
  # Each trainer gets one SIGTERM (a second one would end it before it saved), also one that a
  # restart started just before the supervisor saw the marker.
  for ((i = 0; i < $1 * 5; i++)); do
    alive "$dir" || break
    if pid=$(pid_of "$dir" trainer) && [[ $pid != "$signalled" ]]; then
      kill -TERM "$pid"
      signalled=$pid
      echo "worker $id: SIGTERM sent to the trainer (pid $pid), waiting up to $1 s for it to save"
    fi
    sleep 0.2
  done
  if alive "$dir"; then
    echo "worker $id: still running after $1 s (saving?): see status, or kill the trainer"
    exit 1
  fi
  describe "$id"
}

worker_main() {  # ACTION ARGS...
  local action=$1
  shift
  shopt -s nullglob
  case "$action" in
    worker-check) worker_check ;;
    worker-start) worker_start "$@" ;;
    worker-status) worker_status ;;
    worker-logs) worker_logs "$@" ;;
    worker-stop) worker_stop "$@" ;;
    supervise) supervise "$@" ;;
  esac
}

# --- On the launching machine (bash 3.2 too: a Mac). ---

on_workers() {  # WORKER ACTION ARGS...: runs worker ACTION of this script on WORKER (N or all)
  local worker=$1 script run
  shift
  # The script travels in the command, so every worker runs the launcher you run, whatever its
  # checkout holds; base64 keeps it out of the remote shell's quoting.
  script=$(base64 <"$0" | tr -d '\n')
  run="bash \"\$f\"$(printf ' %q' "$@"); rc=\$?; rm -f \"\$f\"; exit \$rc"
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker="$worker" --command \
    "f=\$(mktemp) && echo $script | base64 -d >\"\$f\" && $run"
}

number() {  # NAME VALUE: VALUE, or a usage error when it is not a whole number
  [[ $2 =~ ^[0-9]+$ ]] || usage_error "$1 takes a whole number, got '$2'"
  echo "$2"
}

case "${1:-}" in
  worker-*|supervise) worker_main "$@"; exit ;;
  ""|-h|--help) usage ;;
esac

action=$1 tpu= zone= extra= restarts=3 worker=0 follow=0
shift
while [[ $# -gt 0 && $1 != -- ]]; do
  case "$action $1" in
    "train --restarts") restarts=$(number --restarts "${2:-}"); shift ;;
    "train --restarts="*) restarts=$(number --restarts "${1#*=}") ;;
    "logs --worker") worker=$(number --worker "${2:-}"); shift ;;
    "logs --worker="*) worker=$(number --worker "${1#*=}") ;;
    "logs --follow") follow=1 ;;
    *" -h"|*" --help") usage ;;
    *" -"*) usage_error "$action takes no option $1 (trainer arguments go after --)" ;;
    *)
      if [[ -z $tpu ]]; then tpu=$1
      elif [[ -z $zone ]]; then zone=$1
      elif [[ $action == setup && -z $extra ]]; then extra=$1
      else usage_error "unexpected argument $1"
      fi ;;
  esac
  shift
done
[[ -n $zone ]] || usage
pause=$(number NANOLLAMA_RESTART_PAUSE "${NANOLLAMA_RESTART_PAUSE:-30}")
stop_timeout=$(number NANOLLAMA_STOP_TIMEOUT "${NANOLLAMA_STOP_TIMEOUT:-600}")

case "$action" in
  setup)
    repo=${extra:-$(git -C "$(dirname "$0")/.." remote get-url origin)}
    gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
      "set -e; if [ ! -d ~/nanollama_jax ]; then git clone '$repo' ~/nanollama_jax; fi;
      cd ~/nanollama_jax && git pull --ff-only && python3 -m venv .venv &&
      .venv/bin/pip install -q -e '.[tpu,gcs,hf]'"
    ;;
  train)
    [[ ${1:-} == -- ]] && shift
    [[ $# -gt 0 ]] || usage_error "train needs the trainer's arguments after --"
    rc=0
    refusals=$(on_workers all worker-check) || rc=$?
    if [[ -n $refusals || $rc != 0 ]]; then
      [[ -z $refusals ]] || echo "$refusals"
      exit 1
    fi
    run=$(date -u +%Y%m%d-%H%M%S)
    on_workers all worker-start "$run" "$restarts" "$pause" -- "$@"
    echo "run $run: watch it with \`$0 status|logs|stop $tpu $zone\`"
    ;;
  status) on_workers all worker-status | sort -t' ' -k2,2n ;;
  logs) on_workers "$worker" worker-logs "$follow" ;;
  stop) on_workers all worker-stop "$stop_timeout" ;;
  *) usage ;;
esac

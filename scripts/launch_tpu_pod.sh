#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...), in parallel.
#
#   scripts/launch_tpu_pod.sh setup TPU_NAME ZONE [REPO_URL]
#       clones the repository (default: this checkout's origin) into ~/nanollama_jax on every
#       worker and installs it with the TPU build of jax
#   scripts/launch_tpu_pod.sh train TPU_NAME ZONE -- --config configs/llama3_2_1b.py \
#       --workdir /mnt/runs/llama1b [--config.mesh.fsdp=-1 ...]
#       starts training on every worker with --multihost: JAX reads the slice's layout from the
#       TPU environment, process 0 logs, and all of them write the checkpoints
#
# The workdir must be a directory every worker sees (an NFS or Filestore mount, or a gcsfuse
# mount of a bucket). Set CLOUDSDK_CORE_PROJECT or `gcloud config set project` first.
set -euo pipefail

usage() { sed -n '2,15p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"
}

case "$action" in
  setup)
    repo=${1:-$(git -C "$(dirname "$0")/.." remote get-url origin)}
    on_all_workers "set -e; if [ ! -d ~/nanollama_jax ]; then git clone '$repo' ~/nanollama_jax; fi;
      cd ~/nanollama_jax && git pull --ff-only && python3 -m venv .venv &&
      .venv/bin/pip install -q -e '.[tpu,gcs,hf]'"
    ;;
  train)
    [[ ${1:-} == "--" ]] && shift
    [[ $# -gt 0 ]] || usage
    args=$(printf ' %q' "$@")
    on_all_workers "cd ~/nanollama_jax && .venv/bin/python -m nanollama_jax.train --multihost$args"
    ;;
  *)
    usage
    ;;
esac

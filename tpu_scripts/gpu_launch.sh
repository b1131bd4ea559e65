#!/usr/bin/env bash
# Multi-GPU training: one rlver_jax process per host, all GPUs of a host in that process.
#
#   tpu_scripts/gpu_launch.sh [--dry-run] slurm     # inside an allocation, or submits one
#   tpu_scripts/gpu_launch.sh [--dry-run] ssh       # plain ssh to HOSTS, process 0 = first host
#   tpu_scripts/gpu_launch.sh [--dry-run] ssh-stop  # SIGINT every host's process (ssh mode)
#
# Settings (environment variables):
#   WORKDIR         run directory on a file system every host sees      (required)
#   CONFIG          config file (default configs/rlver.py)
#   TRAIN_ARGS      extra flags for rlver_jax.train, e.g. "--config.mesh.shape=(2,8,1)"
#   PYTHON          interpreter on the hosts (default .venv/bin/python, relative to REPO_DIR)
#   REPO_DIR        checkout on the hosts (default: this checkout's path)
#   slurm mode:     NODES (default 2), GPUS_PER_NODE (default 8), PARTITION, TIME
#                   (srun's own defaults when unset). JAX reads SLURM's variables to find
#                   the coordinator, so nothing else is needed.
#   ssh mode:       HOSTS "host0 host1 ..." (required), PORT for the coordinator on host0
#                   (default 12355); each host gets RLVER_COORDINATOR, RLVER_NUM_PROCESSES
#                   and RLVER_PROCESS_ID, read by rlver_jax.distributed.maybe_initialize.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == "--dry-run" ]]; then
  export DRY_RUN=1
  shift
fi
mode="${1:-}"
[[ -n "${mode}" ]] || die "usage: $0 [--dry-run] slurm|ssh|ssh-stop"

CONFIG="${CONFIG:-configs/rlver.py}"
PYTHON="${PYTHON:-.venv/bin/python}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
LOG_FILE="rlver_train.log"
PID_FILE="rlver_train.pid"
read -r -a train_args <<< "${TRAIN_ARGS:-}"

train_command() {
  require WORKDIR
  quote_all "${PYTHON}" -m rlver_jax.train --config "${CONFIG}" --workdir "${WORKDIR}" \
    "${train_args[@]}"
}

case "${mode}" in
  slurm)
    srun_args=(--nodes "${NODES:-2}" --ntasks-per-node 1 --gpus-per-node "${GPUS_PER_NODE:-8}"
               --chdir "${REPO_DIR}")
    if [[ -n "${PARTITION:-}" ]]; then
      srun_args+=(--partition "${PARTITION}")
    fi
    if [[ -n "${TIME:-}" ]]; then
      srun_args+=(--time "${TIME}")
    fi
    require WORKDIR
    run srun "${srun_args[@]}" "${PYTHON}" -m rlver_jax.train --config "${CONFIG}" \
      --workdir "${WORKDIR}" "${train_args[@]}"
    ;;
  ssh)
    require HOSTS
    read -r -a host_list <<< "${HOSTS}"
    coordinator="${host_list[0]}:${PORT:-12355}"
    cmd="$(train_command)"
    for i in "${!host_list[@]}"; do
      run ssh "${host_list[i]}" "cd $(quote "${REPO_DIR}") && RLVER_COORDINATOR=${coordinator} \
RLVER_NUM_PROCESSES=${#host_list[@]} RLVER_PROCESS_ID=${i} nohup ${cmd} > ~/${LOG_FILE} 2>&1 \
< /dev/null & echo \$! > ~/${PID_FILE}"
    done
    echo "logs: ssh ${host_list[0]} tail -F ~/${LOG_FILE}"
    ;;
  ssh-stop)
    require HOSTS
    read -r -a host_list <<< "${HOSTS}"
    for host in "${host_list[@]}"; do
      run ssh "${host}" "test -f ~/${PID_FILE} && kill -INT \$(cat ~/${PID_FILE}) || true"
    done
    ;;
  *)
    die "unknown mode ${mode}: expected slurm|ssh|ssh-stop"
    ;;
esac

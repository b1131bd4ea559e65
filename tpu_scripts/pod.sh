#!/usr/bin/env bash
# A TPU VM pod slice for rlver_jax: create it, install the project on every worker, launch
# training on all workers, stream the logs, stop, delete.
#
#   tpu_scripts/pod.sh [--dry-run] create|setup|launch|logs|stop|delete|status
#
# Settings (environment variables):
#   TPU_NAME          pod name                                   (required)
#   ZONE              e.g. us-east5-a                            (required)
#   PROJECT           GCP project (default: gcloud's configured one)
#   ACCELERATOR_TYPE  e.g. v5p-64, v4-32, v6e-16                 (create; default v5p-64)
#   RUNTIME_VERSION   TPU VM image (create; default v2-alpha-tpuv5)
#   SPOT=1            create a spot (pre-emptible) slice; training resumes from checkpoints
#   REPO_URL          git URL to install from (setup); without it the current checkout
#                     (git archive HEAD) is copied to every worker
#   REPO_REF          branch / tag / commit for REPO_URL (default main)
#   JAX_EXTRA         JAX install spec (setup; default "jax[tpu]==0.10.2")
#   CONFIG            config file inside the checkout (launch; default configs/rlver.py)
#   WORKDIR           run directory, shared by all workers (launch): a gs:// URL, so that
#                     checkpoints, metrics, logs and plots outlive the VMs   (required)
#   TRAIN_ARGS        extra flags for rlver_jax.train, e.g. "--config.mesh.shape=(1,8,4)"
#
# Every worker runs the same command; `rlver_jax.distributed.maybe_initialize` joins them
# into one JAX job (RLVER_DISTRIBUTED=1 lets JAX find the workers from the TPU metadata).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == "--dry-run" ]]; then
  export DRY_RUN=1
  shift
fi
action="${1:-}"
[[ -n "${action}" ]] || die "usage: $0 [--dry-run] create|setup|launch|logs|stop|delete|status"

require TPU_NAME ZONE
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
REPO_REF="${REPO_REF:-main}"
JAX_EXTRA="${JAX_EXTRA:-jax[tpu]==0.10.2}"
CONFIG="${CONFIG:-configs/rlver.py}"
REMOTE_DIR="rlver_jax"
LOG_FILE="rlver_train.log"
PID_FILE="rlver_train.pid"

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone "${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  common+=(--project "${PROJECT}")
fi

# Runs a shell command on every worker of the slice.
on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command "$1"
}

case "${action}" in
  create)
    extra=()
    if [[ "${SPOT:-0}" == "1" ]]; then
      extra+=(--spot)
    fi
    run "${gcloud_tpu[@]}" create "${TPU_NAME}" "${common[@]}" \
      --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}" "${extra[@]}"
    ;;
  setup)
    if [[ -n "${REPO_URL:-}" ]]; then
      fetch="rm -rf ${REMOTE_DIR} && git clone --depth 1 --branch ${REPO_REF} ${REPO_URL} ${REMOTE_DIR}"
    else
      tarball="${TMPDIR:-/tmp}/rlver_jax_${TPU_NAME}.tar.gz"
      repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
      run git -C "${repo_root}" archive --format=tar.gz -o "${tarball}" HEAD
      run "${gcloud_tpu[@]}" scp "${tarball}" "${TPU_NAME}:rlver_jax.tar.gz" "${common[@]}" \
        --worker=all
      fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf rlver_jax.tar.gz -C ${REMOTE_DIR}"
    fi
    on_all_workers "set -e; ${fetch}; cd ${REMOTE_DIR}; python3 -m venv .venv; \
.venv/bin/pip install --quiet --upgrade pip; .venv/bin/pip install --quiet -e '.[gcs]' '${JAX_EXTRA}'; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
    ;;
  launch)
    require WORKDIR
    # nohup + background: the ssh session returns; `logs` follows worker 0's log.
    # TRAIN_ARGS splits on spaces; each flag is quoted for the remote shell, so values
    # such as --config.mesh.shape=(1,8,4) arrive intact.
    read -r -a train_args <<< "${TRAIN_ARGS:-}"
    train_cmd="$(quote_all .venv/bin/python -m rlver_jax.train --config "${CONFIG}" \
      --workdir "${WORKDIR}" "${train_args[@]}")"
    on_all_workers "cd ${REMOTE_DIR} && RLVER_DISTRIBUTED=1 nohup ${train_cmd} \
> ~/${LOG_FILE} 2>&1 < /dev/null & echo \$! > ~/${PID_FILE}"
    ;;
  logs)
    run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=0 \
      --command "tail -n 200 -F ~/${LOG_FILE}"
    ;;
  stop)
    # SIGINT: the trainer's pre-emption guard saves a checkpoint before exiting.
    on_all_workers "test -f ~/${PID_FILE} && kill -INT \$(cat ~/${PID_FILE}) || true"
    ;;
  delete)
    run "${gcloud_tpu[@]}" delete "${TPU_NAME}" "${common[@]}" --quiet
    ;;
  status)
    run "${gcloud_tpu[@]}" describe "${TPU_NAME}" "${common[@]}"
    ;;
  *)
    die "unknown action ${action}: expected create|setup|launch|logs|stop|delete|status"
    ;;
esac

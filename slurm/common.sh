# shellcheck shell=bash
# Helpers shared by the slurm/*.sbatch job scripts (sourced, never run).
#
# Why a separate file, found through MA_REPO: sbatch runs a spooled copy of each job script, so a
# script cannot find its siblings through $0; each one locates the repository (MA_REPO, else the
# submit directory) and sources this file from there. Everything here is parameterised by environment variables; nothing is
# meant to be edited by hand.

ma_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-}: $*"; }

# Node names listed in an exclude file written by preflight.sbatch: one per line, '#' starts a comment.
ma_read_exclude() {
  local file="$1"
  [[ -f "$file" ]] || return 0
  sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$file"
}

# Comma-joined exclude list (empty when the file is missing or lists no node), for `sbatch --exclude`.
ma_exclude_csv() { ma_read_exclude "$1" | paste -sd, -; }

# Outside a job (no SLURM_JOB_ID) a job script submits itself, adding the preflight exclude list, so
# `slurm/pretrain.sbatch CONFIG` and `sbatch slurm/pretrain.sbatch CONFIG` both work. sbatch options
# go in SBATCH_* environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...).
ma_submit_self_if_outside_job() {
  local script="$1" exclude_file="$2"
  shift 2
  [[ -z "${SLURM_JOB_ID:-}" ]] || return 0
  local exclude
  exclude="$(ma_exclude_csv "$exclude_file")"
  echo "not inside a SLURM job: submitting $script${exclude:+ with --exclude=$exclude}" >&2
  exec sbatch ${exclude:+"--exclude=$exclude"} "$script" "$@"
}

# Refuse to train on nodes that preflight excluded (the job was submitted without the exclude list).
# SLURM cannot change a running job's excluded nodes, so the job fails fast and says how to resubmit.
ma_check_allocation() {
  local exclude_file="$1" bad
  [[ -s "$exclude_file" ]] || return 0
  bad="$(comm -12 <(ma_read_exclude "$exclude_file" | sort -u) \
    <(scontrol show hostnames "$SLURM_JOB_NODELIST" | sort -u) | paste -sd, -)"
  if [[ -n "$bad" ]]; then
    echo "megatron-align job: allocated node(s) $bad are listed in $exclude_file (failed preflight)." >&2
    echo "Resubmit with: sbatch --exclude=$(ma_exclude_csv "$exclude_file") ..." >&2
    echo "(or run the job script directly, outside a job: it submits itself with the exclusions)" >&2
    return 1
  fi
}

# srun options that run a step inside a container with pyxis/enroot when MA_CONTAINER_IMAGE is set
# (an image reference or a .sqsh file). The repository is mounted at the same path, so configs, data
# and run directories given as repository paths resolve identically inside and outside.
ma_container_args() {
  local repo="$1"
  [[ -n "${MA_CONTAINER_IMAGE:-}" ]] || return 0
  local mounts="$repo:$repo"
  [[ -z "${MA_CONTAINER_MOUNTS:-}" ]] || mounts="$mounts,$MA_CONTAINER_MOUNTS"
  printf '%s\n' "--container-image=$MA_CONTAINER_IMAGE" "--container-mounts=$mounts" \
    "--container-workdir=$repo" "--no-container-mount-home"
}

# Rendezvous for torch.distributed: the first node of the allocation, and a port derived from the
# job id so two jobs sharing a node do not collide (and a requeued job gets the same port back).
ma_export_rendezvous() {
  MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  MASTER_PORT="${MASTER_PORT:-$((${MA_MASTER_PORT_BASE:-20000} + SLURM_JOB_ID % 20000))}"
  export MASTER_ADDR MASTER_PORT
}

# NCCL / InfiniBand settings for H100 nodes (8 GPUs, 8 x 400G NDR compute NICs). Each is a default:
# any value already in the environment wins. Check device names with `ibstat` / `ibv_devices`.
ma_export_nccl_defaults() {
  export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"                      # prefix: every mlx5 IB port
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker,virbr}" # bootstrap over a real interface
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"                # tolerate transient IB link flaps
  export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-1}"               # NVLink SHARP on NVSwitch systems
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}" # Megatron TP comm/compute overlap
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

# Run "$@" in the background and wait for it, forwarding SIGUSR1 (sent by SLURM before the time limit,
# `--signal=B:USR1@180`) and SIGTERM to it; srun passes both on to every task, whose trainers
# checkpoint and stop. Sets MA_GOT_USR1=1 when USR1 arrived. Returns the command's exit status.
# shellcheck disable=SC2034  # read by the job scripts after the call
MA_GOT_USR1=0
ma_run_forwarding_signals() {
  local child status
  "$@" &
  child=$!
  # shellcheck disable=SC2064  # expand $child now: the trap must target this child
  trap "MA_GOT_USR1=1; ma_log 'USR1: asking the ranks to checkpoint and stop'; kill -USR1 $child 2>/dev/null || true" USR1
  # shellcheck disable=SC2064
  trap "ma_log 'TERM: stopping the ranks'; kill -TERM $child 2>/dev/null || true" TERM
  # `wait` returns early when a trapped signal arrives; keep waiting until the child is gone.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" 2>/dev/null || true
  done
  status=0
  wait "$child" || status=$?
  trap - USR1 TERM
  return "$status"
}

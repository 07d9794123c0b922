#!/usr/bin/env bash
# Launches t5jax training: on this machine, as N local processes, on a TPU VM pod, or on a Slurm GPU cluster.
#
#   ./launch.sh [--dry_run] local CONFIG [train flags...]
#   ./launch.sh [--dry_run] multiprocess N CONFIG [train flags...]
#   ./launch.sh [--dry_run] tpu-pod NAME ZONE CONFIG [train flags...]
#   ./launch.sh [--dry_run] slurm NODES GPUS_PER_NODE CONFIG [train flags...]
#
# Train flags go to `python -m t5jax.train` as they are (--workdir=DIR, --config.key=value, ...).
# --dry_run prints the exact commands instead of running them.
# Environment: PYTHON (default python3), PORT (coordinator port, default 12355), DEVICES_PER_PROCESS
# (multiprocess: fake CPU devices per process), LOG_DIR (multiprocess: per-process logs, default /tmp),
# TPU_DIR (tpu-pod: code directory on the workers), SBATCH_ARGS (slurm: extra #SBATCH lines' arguments).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-12355}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "launch.sh: error: $*" >&2; exit 2; }
quote() { printf '%q ' "$@"; }
need_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

# Prints a command (dry run) or runs it.
run() {
  if (( DRY_RUN )); then echo "$(quote "$@")"; else "$@"; fi
}

mode="${1:-}"; [[ -n "$mode" ]] || usage; shift

case "$mode" in
  local)
    (( $# >= 1 )) || usage
    config="$1"; shift
    run "$PYTHON" -m t5jax.train "--config=$config" "$@"
    ;;

  multiprocess)
    (( $# >= 2 )) || usage
    n="$1"; config="$2"; shift 2
    need_int N "$n"
    log_dir="${LOG_DIR:-/tmp}"
    pids=()
    # Process 0 is the coordinator; each process reads its own rows of every batch and all of them write
    # their checkpoint shards. The first process to fail takes the others down, so nothing hangs.
    for (( i = 0; i < n; i++ )); do
      env_vars=(T5JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" T5JAX_NUM_PROCESSES="$n" T5JAX_PROCESS_ID="$i")
      if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
        env_vars+=(XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
      fi
      cmd=(env "${env_vars[@]}" "$PYTHON" -m t5jax.train "--config=$config" "$@")
      if (( DRY_RUN )); then
        if (( i == 0 )); then echo "$(quote "${cmd[@]}")&"; else echo "$(quote "${cmd[@]}")> $log_dir/t5jax_process_$i.log 2>&1 &"; fi
        continue
      fi
      if (( i == 0 )); then "${cmd[@]}" & else "${cmd[@]}" > "$log_dir/t5jax_process_$i.log" 2>&1 & fi
      pids+=($!)
    done
    (( DRY_RUN )) && exit 0
    trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
    status=0
    for (( left = n; left > 0; left-- )); do
      if ! wait -n "${pids[@]}"; then status=1; kill "${pids[@]}" 2>/dev/null || true; fi
    done
    (( status == 0 )) || echo "launch.sh: a process failed; logs of processes 1..$((n - 1)) are in $log_dir" >&2
    exit "$status"
    ;;

  tpu-pod)
    (( $# >= 3 )) || usage
    name="$1"; zone="$2"; config="$3"; shift 3
    dir="${TPU_DIR:-t5jax}"
    # Every worker gets the same code, installs it, and runs the same command; JAX finds its peers itself.
    run gcloud compute tpus tpu-vm scp --recurse "$HERE" "$name:~/$dir" --zone="$zone" --worker=all
    remote="cd ~/$dir && $PYTHON -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2' -e . && "
    remote+="T5JAX_DISTRIBUTED=auto $PYTHON -m t5jax.train $(quote "--config=$config" "$@")"
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
    ;;

  slurm)
    (( $# >= 3 )) || usage
    nodes="$1"; gpus="$2"; config="$3"; shift 3
    need_int NODES "$nodes"; need_int GPUS_PER_NODE "$gpus"
    # One task per GPU: srun starts NODES x GPUS_PER_NODE processes and JAX reads their ranks from Slurm.
    script="#!/usr/bin/env bash
#SBATCH --job-name=t5jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --output=t5jax-%j.out
${SBATCH_ARGS:+#SBATCH $SBATCH_ARGS
}cd $(quote "$HERE")
srun --kill-on-bad-exit=1 $PYTHON -m t5jax.train $(quote "--config=$config" "$@")"
    if (( DRY_RUN )); then echo "$script"; echo "# submit with: sbatch <this script>"; exit 0; fi
    echo "$script" | sbatch
    ;;

  *) usage ;;
esac

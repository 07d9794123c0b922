#!/usr/bin/env bash
# Launches t5jax training: on this machine, as N local processes, on a TPU VM pod, or on a Slurm GPU cluster.
#
#   ./launch.sh [--dry_run] local CONFIG [train flags...]
#   ./launch.sh [--dry_run] multiprocess N CONFIG [train flags...]
#   ./launch.sh [--dry_run] tpu-pod NAME ZONE CONFIG [train flags...]
#   ./launch.sh [--dry_run] slurm NODES GPUS_PER_NODE CONFIG [train flags...]
#
# Train flags go to `python -m $ENTRY` as they are (--workdir=DIR, --config.key=value, ...); ENTRY is
# t5jax.train, or t5jax.distill for distillation's two steps (a teacher first, then the student).
# --dry_run prints the exact commands instead of running them.
# Environment: PYTHON (default: the active venv's python, else this checkout's .venv/bin/python, else python3;
# on TPU workers, python3), PORT (coordinator port, default 12355), DEVICES_PER_PROCESS (multiprocess: fake CPU
# devices per process), LOG_DIR (multiprocess: per-process logs, default /tmp), TPU_DIR (tpu-pod: code
# directory on the workers), SBATCH_ARGS (slurm: extra #SBATCH lines' arguments).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
PORT="${PORT:-12355}"
ENTRY="${ENTRY:-t5jax.train}"
[[ "$ENTRY" =~ ^t5jax\.[a-z_]+$ ]] || { echo "launch.sh: ENTRY=$ENTRY is not a t5jax module (t5jax.train, t5jax.distill)" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The python that runs t5jax here. The README installs into .venv without activating it, so python3 on PATH
# may lack the dependencies.
explicit_python="${PYTHON:-}"
if [[ -n "$explicit_python" ]]; then PYTHON="$explicit_python"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
elif [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"
else PYTHON=python3
fi

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
    run "$PYTHON" -m "$ENTRY" "--config=$config" "$@"
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
        env_vars+=(XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
      fi
      cmd=(env "${env_vars[@]}" "$PYTHON" -m "$ENTRY" "--config=$config" "$@")
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
    live=("${pids[@]}")
    while (( ${#live[@]} > 0 )); do
      # -p names the process that ended, so it leaves the list: waiting on it again is an error.
      if ! wait -n -p ended "${live[@]}"; then status=1; kill "${live[@]}" 2>/dev/null || true; fi
      rest=()
      for pid in "${live[@]}"; do [[ "$pid" == "$ended" ]] || rest+=("$pid"); done
      live=("${rest[@]}")
    done
    (( status == 0 )) || echo "launch.sh: a process failed; logs of processes 1..$((n - 1)) are in $log_dir" >&2
    exit "$status"
    ;;

  tpu-pod)
    (( $# >= 3 )) || usage
    name="$1"; zone="$2"; config="$3"; shift 3
    dir="${TPU_DIR:-t5jax}"
    remote_python="${explicit_python:-python3}"   # a local venv's path means nothing on the workers
    # Every worker gets the same code, installs it, and runs the same command; JAX finds its peers itself.
    # Only the tracked files (as they are in the working tree) travel: not .venv, workdirs or caches.
    stage="$(mktemp -d)"; trap 'rm -rf "$stage"' EXIT
    here_q="$(printf %q "$HERE")"; stage_q="$(printf %q "$stage")"
    copy="git -C $here_q ls-files -z | tar -C $here_q --null -T - -cf - | tar -C $stage_q -xf -"
    if (( DRY_RUN )); then echo "$copy"; else eval "$copy"; fi
    run gcloud compute tpus tpu-vm scp --recurse "$stage" "$name:~/$dir" --zone="$zone" --worker=all
    remote="cd ~/$dir && $remote_python -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2' -e . && "
    remote+="T5JAX_DISTRIBUTED=auto $remote_python -m $ENTRY $(quote "--config=$config" "$@")"
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
srun --kill-on-bad-exit=1 $PYTHON -m $ENTRY $(quote "--config=$config" "$@")"
    if (( DRY_RUN )); then echo "$script"; echo "# submit with: sbatch <this script>"; exit 0; fi
    echo "$script" | sbatch
    ;;

  *) usage ;;
esac

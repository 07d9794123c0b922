#!/usr/bin/env bash
# The one-shot GPU check (issue 27): ~6 minutes on one H200, everything written into OUT as it goes.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to $OUT, else ./gpu_check_out
#
# OUT ends with 7 files, as the device tool brings back 8 at most: parts.txt (each part's exit code, seconds
# and last lines), versions.json, nvidia-smi.txt, results.jsonl (every benchmark's JSON lines, appended as
# measured), logs.tar.gz (each part's log, tests.xml, pip freeze; rebuilt after every part), profile.tar.gz
# (the trace and the step's optimized HLO) and .gitignore. The rest (videos, HLO dumps) stays in a scratch
# folder, GPU_CHECK_WORK (default: a new one under /tmp).
#
# Parts, each under its own `timeout`; a part that fails or hangs is noted in parts.txt and the next one starts:
#   versions  nvidia-smi, Python / JAX / jaxlib / flax / torch / transformers versions, the devices
#   tests     a GPU smoke subset of tests/: HF parity in float32, greedy decoding against transformers, a train
#             run killed and resumed bit for bit, the run built on a one-device mesh (jit and pmap)
#   train     benchmarks/train_throughput.py: t5jax vs PyTorch tokens/s, bfloat16, --quick
#   generate  benchmarks/generate_throughput.py: greedy decoding vs transformers' generate()
#   video     benchmarks/loader_throughput.py --video: clips/s to the device vs the train step's
#   profile   benchmarks/profile_step.py: a jax.profiler trace of forward+backward steps
# First, the wheels in wheels/ (benchmarks/gpu_wheels.sh) whose packages are missing go into a folder on
# PYTHONPATH (pip --target: the image's own environment stays as it is).
#
# Environment (defaults are the GPU run's; the CPU rehearsal shrinks them, see docs/gpu.md):
#   GPU_CHECK_PRESET=t5.1.1-base GPU_CHECK_DTYPE=bfloat16 GPU_CHECK_BATCH=64 GPU_CHECK_INPUTS=512
#   GPU_CHECK_ROUNDS=3 GPU_CHECK_STEPS=2 GPU_CHECK_GEN_PRESET=$GPU_CHECK_PRESET GPU_CHECK_GEN_BATCH=64
#   GPU_CHECK_NEW_TOKENS=64 GPU_CHECK_GEN_INPUTS=64 GPU_CHECK_VIDEOS=64 GPU_CHECK_VIDEO_BATCH=32
#   GPU_CHECK_VIDEO_STEPS=20 GPU_CHECK_PROFILE_BATCH=$GPU_CHECK_BATCH GPU_CHECK_PROFILE_STEPS=3
#   GPU_CHECK_TESTS="tests/...::test ..." (the smoke subset), and each part's limit in seconds:
#   GPU_CHECK_TIMEOUT_{TESTS,TRAIN,GENERATE,VIDEO,PROFILE}
#   JAX_PLATFORMS (default cuda: a JAX that cannot reach the GPU fails instead of running on the CPU), PYTHON.
set -uo pipefail  # no -e: a failed part is recorded and the check goes on

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-${OUT:-./gpu_check_out}}" && cd "${1:-${OUT:-./gpu_check_out}}" && pwd)"
echo '*' > "$OUT/.gitignore"  # run inside the checkout, its results stay out of git and of the next copy
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
SITE="$WORK/site"
export PYTHONUNBUFFERED=1  # a part killed at its limit still leaves all it printed in its log
cd "$HERE"
if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
PRESET="${GPU_CHECK_PRESET:-t5.1.1-base}"
DTYPE="${GPU_CHECK_DTYPE:-bfloat16}"
BATCH="${GPU_CHECK_BATCH:-64}"
INPUTS="${GPU_CHECK_INPUTS:-512}"
TESTS="${GPU_CHECK_TESTS:-tests/test_hf.py::test_parity tests/test_decode.py::test_greedy_matches_transformers
  tests/test_train.py::test_resume_after_sigkill_is_bitwise_exact
  tests/test_setup.py::test_build_creates_no_concrete_array}"

# part NAME SECONDS COMMAND...: runs COMMAND into OUT/NAME.log under `timeout`, notes its exit code and time.
part() {
  local name="$1" limit="$2" start="$SECONDS"; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/parts.txt"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') in $((SECONDS - start)) s" \
    | tee -a "$OUT/parts.txt"
  tail -n 5 "$WORK/$name.log" | tee -a "$OUT/parts.txt"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=./site --exclude=./video_work --exclude=./profile .
}

# The trace (Perfetto JSON, and XPlane for xprof) and the profiled step's optimized HLO; the Perfetto trace
# alone if that is over the 16 MiB a file the device tool brings back.
pack_profile() (
  cd "$WORK/profile" || exit
  tar -czf "$OUT/profile.tar.gz" trace hlo/*jit_profiled_loss.*after_optimizations.txt
  if (($(stat -c %s "$OUT/profile.tar.gz") > 15 * 2 ** 20)); then
    find trace -name '*perfetto_trace.json.gz' -print0 | tar -czf "$OUT/profile.tar.gz" --null -T -
  fi
  ls -l "$OUT/profile.tar.gz"
)

# (0) The wheels the image lacks; those whose package is already installed are left out, so the image's own
# builds stay first on the path.
install_wheels() {
  local missing=()
  for wheel in wheels/*.whl; do
    local dist="${wheel#wheels/}"; dist="${dist%%-*}"
    "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2> /dev/null \
      || missing+=("$wheel")
  done
  echo "missing here: ${missing[*]:-none}"
  ((${#missing[@]} == 0)) \
    || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}"
}

versions() {
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi here" >> "$OUT/nvidia-smi.txt"
  "$PYTHON" -m pip freeze > "$WORK/pip-freeze.txt" 2>&1
  "$PYTHON" - "$OUT/versions.json" <<'EOF'
import importlib.metadata, json, platform, sys

found = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "torch", "transformers", "grain", "decord", "av"):
  try:
    found[name] = importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    pass
try:
  import jax
  found["jax_devices"] = [f"{d.platform}: {d.device_kind}" for d in jax.devices()]
except Exception as e:  # the record says why, and the check goes on
  found["jax_devices"] = f"error: {e}"
try:
  import torch
  found["torch_cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as e:
  found["torch_cuda"] = f"error: {e}"
json.dump(found, open(sys.argv[1], "w"), indent=1)
print(json.dumps(found, indent=1))
EOF
}

export OUT WORK SITE PYTHON
export -f install_wheels versions  # `timeout` runs programs: these run as `bash -c NAME`
start="$SECONDS"
echo "gpu_check: $(date -u +%FT%TZ) into $OUT | $PRESET $DTYPE batch $BATCH inputs $INPUTS" \
  "| JAX_PLATFORMS=$JAX_PLATFORMS" \
  | tee "$OUT/parts.txt"
[[ -d wheels ]] && part install 45 bash -c install_wheels
[[ -d "$SITE" ]] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
part versions 60 bash -c versions
# pytest: pyproject's addopts ask for xdist workers; -o addopts= runs in this process. float32 parity is read at
# 1e-4, so matmuls run at full float32 (a GPU's default rounds them to TF32); deterministic ops, or the resumed
# run's scatter-adds (embedding gradients) may sum in another order than the uninterrupted one's. No
# preallocation: the test process and the training runs it starts share the GPU, and each would take 75%.
part tests "${GPU_CHECK_TIMEOUT_TESTS:-140}" env JAX_DEFAULT_MATMUL_PRECISION=highest \
  XLA_PYTHON_CLIENT_PREALLOCATE=false \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  "$PYTHON" -m pytest -o addopts= -q -ra -p no:cacheprovider --durations=15 --junitxml="$WORK/tests.xml" $TESTS
part train "${GPU_CHECK_TIMEOUT_TRAIN:-110}" "$PYTHON" benchmarks/train_throughput.py --preset="$PRESET" \
  --dtype="$DTYPE" --batch="$BATCH" --inputs_length="$INPUTS" --rounds="${GPU_CHECK_ROUNDS:-3}" \
  --steps="${GPU_CHECK_STEPS:-2}" --quick --out="$OUT/results.jsonl"
part generate "${GPU_CHECK_TIMEOUT_GENERATE:-75}" "$PYTHON" benchmarks/generate_throughput.py \
  --preset="${GPU_CHECK_GEN_PRESET:-$PRESET}" --dtype="$DTYPE" --batch="${GPU_CHECK_GEN_BATCH:-64}" \
  --new_tokens="${GPU_CHECK_NEW_TOKENS:-64}" --input_len="${GPU_CHECK_GEN_INPUTS:-64}" \
  --rounds="${GPU_CHECK_ROUNDS:-3}" --out="$OUT/results.jsonl"
part video "${GPU_CHECK_TIMEOUT_VIDEO:-50}" "$PYTHON" benchmarks/loader_throughput.py --video \
  --workdir="$WORK/video_work" --videos="${GPU_CHECK_VIDEOS:-64}" --batch_size="${GPU_CHECK_VIDEO_BATCH:-32}" \
  --steps="${GPU_CHECK_VIDEO_STEPS:-20}" --workers=0,2 --out="$OUT/results.jsonl"
part profile "${GPU_CHECK_TIMEOUT_PROFILE:-50}" "$PYTHON" benchmarks/profile_step.py --preset="$PRESET" \
  --dtype="$DTYPE" --batch="${GPU_CHECK_PROFILE_BATCH:-$BATCH}" --inputs_length="$INPUTS" \
  --steps="${GPU_CHECK_PROFILE_STEPS:-3}" --out="$WORK/profile"
pack_profile
echo "gpu_check: done in $((SECONDS - start)) s; files in $OUT, scratch in $WORK" | tee -a "$OUT/parts.txt"

#!/usr/bin/env bash
# The README's table of T5.1.1 sizes and the MoE config planned for TPU pods by the TPU compiler on a CPU host
# (python -m t5jax.plan --topology): one JSON per row in experiments/plan_pods/, rows already there skipped.
# Compiles run one after another (each takes minutes on a shared 2-core machine); needs `pip install -e .[tpu-plan]`.
#   experiments/plan_pods.sh [MODEL...]     e.g. experiments/plan_pods.sh xl    (default: every row)
#   experiments/plan_pods.sh --table        the README's markdown rows, from the JSON files
#   experiments/plan_pods.sh --search MODEL...   plan --search on v5e:4x4 (SEARCH_TOPOLOGY) over a small grid
#                                                (SEARCH_MESHES x SEARCH_REMAT, scan on): search_MODEL_v5e_4x4.json;
#                                                SEARCH_MICROBATCHES, SEARCH_TIMEOUT s per point, SEARCH_WORKERS
#                                                points at once; points planned before come from plan's cache
#   experiments/plan_pods.sh --search-table      every point of each search as a markdown row, ranked (1: the best)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/plan_pods
PY=${PYTHON:-python}
if [[ ${1:-} == --table ]]; then
  exec "$PY" - "$OUT"/*.json <<'TABLE'
import json, sys
for path in sys.argv[1:]:
  if "/search_" in path:
    continue
  r = json.load(open(path))
  mesh = " x ".join(f"{a} {n}" for a, n in r["mesh"].items() if n > 1)
  memory = f"{r['total_bytes'] / 2**30:.2f} GiB of {r['chip']['hbm_bytes'] / 1e9:.0f} GB"
  f = r.get("roofline")
  speed = (f"{f['compute_s'] * 1e3:,.0f} / {f['comm_s'] * 1e3:,.0f} | "
           f"{f['overlapped_s'] * 1e3:,.0f}-{f['serial_s'] * 1e3:,.0f} | {f['serial_mfu']:.0%}-{f['overlapped_mfu']:.0%}"
           if f else "- | - | -")
  print(f"| {path.split('/')[-1][:-5]} | {r['params'] / 1e9:.2f}B | {r['target']} | {mesh} | {memory} | "
        f"{'yes' if r['fits'] else 'no'} | {speed} | {r['compile_s'] / 60:.0f} min |")
TABLE
fi
if [[ ${1:-} == --search-table ]]; then
  exec "$PY" - "$OUT"/search_*.json <<'TABLE'
import json, sys
from t5jax.planning.search import ranked
for path in sys.argv[1:]:
  points = json.load(open(path))
  fits = ranked(points)
  for rank, p in enumerate(fits + [p for p in points if not p.get("fits")], 1):
    f, (remat, micro) = p.get("roofline"), (o.split("=")[1] for o in p["overrides"][:2])
    figures = (f"{p['total_bytes'] / 2**30:.2f} GiB | {f['compute_s'] * 1e3:,.0f} / {f['comm_s'] * 1e3:,.0f} | "
               f"{f['overlapped_s'] * 1e3:,.0f} | {f['overlapped_mfu']:.0%}" if f
               else f"temporaries alone {p['temp_bytes'] / 2**30:.2f} GiB | - | - | -" if p.get("temp_bytes")
               else "- | - | - | -")
    verdict = "yes" if p.get("fits") else "no" if p.get("fits") is False else p.get("error", "failed")
    took = f"{p['compile_s'] / 60:.0f} min" if "compile_s" in p else "-"
    print(f"| {path.split('/')[-1][7:-5]} | {rank if p.get('fits') else '-'} | {p['mesh']} | {remat} | {micro} | {figures} | "
          f"{verdict} | {took} |")
TABLE
fi
# T5's pretraining shape in bf16: 256 x 512 inputs / 114 targets, Adafactor, scanned layers, full remat.
COMMON=(--config.batch_size=256 --config.data.inputs_length=512 --config.model.dtype=bfloat16
        --config.model.scan_layers=True --config.model.remat_policy=full)
declare -A CONFIG=([small]=configs/base.py:t5.1.1-small [base]=configs/base.py:t5.1.1-base
                   [large]=configs/base.py:t5.1.1-large [xl]=configs/base.py:t5.1.1-xl
                   [xxl]=configs/base.py:t5.1.1-xxl
                   [moe]="configs/moe.py --config.model.vocab_size=32128 --config.model.d_model=768 --config.model.d_ff=2048 --config.model.num_heads=12 --config.model.d_kv=64 --config.model.num_encoder_layers=12 --config.model.num_decoder_layers=12")
# v5e-16 is 16 chips (4x4); v5p-32 is 16 chips (2x2x4: Google counts v5p slices in TensorCores, 2 per chip).
read -r -a TOPOLOGIES <<< "${TOPOLOGIES:-v5e:4x4 v5p:2x2x4}"   # or e.g. TOPOLOGIES=v5e:4x4
if [[ ${1:-} == --search ]]; then
  shift
  topology=${SEARCH_TOPOLOGY:-v5e:4x4}
  for model in "$@"; do
    # shellcheck disable=SC2086
    set -- ${CONFIG[$model]}
    "$PY" -m t5jax.plan --config="$1" "${@:2}" "${COMMON[@]}" --topology="$topology" --search \
      --search_meshes="${SEARCH_MESHES:-fsdp=16;data=4,fsdp=4;data=2,fsdp=8}" --search_remat="${SEARCH_REMAT:-full,none}" \
      --search_microbatches="${SEARCH_MICROBATCHES:-1}" --search_timeout="${SEARCH_TIMEOUT:-900}" --search_workers="${SEARCH_WORKERS:-1}" --json="$OUT/search_${model}_${topology/:/_}.json" 2>&1 | grep -E "^ *[0-9-]+\.? |^searching|error"
  done
  exit
fi
models=("$@")
[[ $# -gt 0 ]] || models=(small base large xl xxl moe)
for model in "${models[@]}"; do
  for topology in "${TOPOLOGIES[@]}"; do
    json="$OUT/${model}_${topology/:/_}.json"
    [[ -s $json ]] && continue
    # shellcheck disable=SC2086  (CONFIG holds the config path and, for moe, its shape overrides)
    set -- ${CONFIG[$model]}
    /usr/bin/time -f "$model $topology: %e s wall" "$PY" -m t5jax.plan --config="$1" "${@:2}" "${COMMON[@]}" \
      --topology="$topology" --mesh=fsdp=16 --json="$json" --hlo="/tmp/plan_pods_${model}_${topology/:/_}.hlo" 2>&1 | grep -E "wall|error|^[A-Za-z0-9 ]" | grep -v WARNING
  done
done

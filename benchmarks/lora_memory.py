r"""Trainable params and per-device memory of LoRA against full fine-tuning, from `python -m t5jax.plan`.

  python benchmarks/lora_memory.py [--models=t5.1.1-base,flan-t5-xl,flan-t5-xxl] [--tpu] [--out=DIR]

Every point is one `t5jax.plan` run (its --json): the analytic plan for one 80 GB H100 (`--platform=gpu
--topology=h100:1`), and with --tpu the TPU compiler's for v5e:2x2 (needs `pip install -e .[tpu-plan]`).
The fine-tuning shape: AdamW, bfloat16 compute, batch 32 of 512 input tokens (114 targets), scanned layers
with full remat (what fits the largest models); full fine-tuning against LoRA rank 16 on every linear layer, its base held in bfloat16 and in
int8. Prints a markdown table: trained params, their optimizer state, the frozen base, the total per device
and whether it fits.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = [
  "--config.optimizer.name=adamw",
  "--config.model.dtype=bfloat16",
  "--config.batch_size=32",
  "--config.data.inputs_length=512",
  "--config.model.scan_layers=True",
  "--config.model.remat_policy=full",
]
LORA = ["--config.finetune.lora.rank=16", "--config.init_from=BASE"]  # planned: the base is never read
MODES = {
  "full": [],
  "LoRA r16, bf16 base": [*LORA, "--config.finetune.lora.base_dtype=bfloat16"],
  "LoRA r16, int8 base": [*LORA, "--config.finetune.lora.base_dtype=int8"],
}
TARGETS = {"h100:1": ["--platform=gpu", "--topology=h100:1"], "v5e:2x2": ["--topology=v5e:2x2"]}


def plan(model, target, mode, mesh, out_dir):
  path = os.path.join(out_dir, f"{model}_{target}_{mode}.json".replace(" ", "_").replace(",", ""))
  command = [
    sys.executable,
    "-m",
    "t5jax.plan",
    f"--config={ROOT}/configs/base.py:{model}",
    f"--mesh={mesh}",
    f"--json={path}",
    *TARGETS[target],
    *SHAPE,
    *MODES[mode],
  ]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TPU_SKIP_MDS_QUERY="1"))
  if out.returncode:
    raise SystemExit(f"{model} {target} {mode}: {out.stderr.strip().splitlines()[-1]}")
  with open(path) as f:
    return json.load(f)


def gib(n):
  return f"{n / 2**30:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="t5.1.1-base,flan-t5-xl,flan-t5-xxl")
  parser.add_argument("--tpu", action="store_true", help="also the TPU compiler's plan for v5e:2x2 (fsdp=4)")
  parser.add_argument("--out", default=None, help="keep each plan's JSON here")
  args = parser.parse_args()
  out_dir = args.out or tempfile.mkdtemp(prefix="lora_memory_")
  os.makedirs(out_dir, exist_ok=True)
  targets = [("h100:1", "data=1")] + ([("v5e:2x2", "data=1,fsdp=4")] if args.tpu else [])
  print(
    "| model | target | fine-tuning | trained params | optimizer state GiB | frozen base GiB | merged GiB | total GiB | fits |"
  )
  print("|---|---|---|---:|---:|---:|---:|---:|---|")
  for model in args.models.split(","):
    for target, mesh in targets:
      for mode in MODES:
        r = plan(model, target, mode, mesh, out_dir)
        print(
          f"| {model} | {target} ({r['source']}) | {mode} | {r['trained_params'] / 1e6:,.1f}M "
          f"of {r['params'] / 1e6:,.1f}M | {gib(r['opt_bytes'])} | {gib(r.get('frozen_bytes', 0))} | {gib(r.get('merged_bytes', 0))} | "
          f"{gib(r['total_bytes'])} | {'yes' if r['fits'] else 'no'} |",
          flush=True,
        )


if __name__ == "__main__":
  main()

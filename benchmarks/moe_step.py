r"""Train-step time of a Switch MoE T5 (8 experts, top-1, capacity factor 1.25, every second FFN sparse) over
the dense T5 it is built from, at equal active FLOPs (each expert as wide as the dense FFN), in one process
with rounds alternated. Target: <= 1.3x.

  python benchmarks/moe_step.py [--rounds 5] [--steps 5] [--preset t5.1.1-small] [--batch 8] [--group_size 128]

Both models are configs/moe.py's (the default: configs/base.py's tiny T5.1.1, batch 32 x 128); `--preset`
swaps in a real size. Batches are random token ids of the configured shapes; the steps are the ones
`t5jax.setup.build` compiles for training.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import moe  # noqa: E402
from t5jax import parallel, setup  # noqa: E402


def cpu_name():
  for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def build(num_experts, preset, batch, group_size):
  config = moe.get_config()
  if group_size:
    config.model.moe_group_size = group_size
  if preset:
    from t5jax.model import get_preset
    config.model.update(get_preset(preset))
  config.model.num_experts = num_experts
  if batch:
    config.batch_size = batch
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh):
    run = setup.build(config, mesh)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(3, 1000, x.shape).astype(x.dtype) for k, x in run.batch_spec.items()}
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_loss_weights"])
    step = run.compile_train_step()
    return run.init_state(), step, parallel.host_to_global(batch, run.batch_sharding), mesh


def seconds_per_step(state, step, batch, steps):
  state, m = step(state, batch)   # warm
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--preset", default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--group_size", type=int, default=None, help="moe_group_size (default: configs/moe.py's)")
  args = parser.parse_args()
  runs = {name: list(build(n, args.preset, args.batch, args.group_size)) for name, n in (("dense", 0), ("moe8", 8))}
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, r in runs.items():
      with parallel.use_mesh(r[3]):
        r[0], t = seconds_per_step(r[0], r[1], r[2], args.steps)
      times[name].append(t)
  ratios = [m / d for m, d in zip(times["moe8"], times["dense"])]
  print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); model {args.preset or 'configs/base.py tiny'}")
  for name, ts in times.items():
    print(f"  {name:6s} {statistics.median(ts) * 1e3:8.1f} ms/step (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
  print(f"  moe8 / dense: median {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
  main()

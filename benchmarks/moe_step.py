r"""Train-step time of a Switch MoE T5 (8 experts, top-1, capacity factor 1.25, every second FFN sparse) over
the dense T5 it is built from, at equal active FLOPs (each expert as wide as the dense FFN), in one process
with rounds alternated. Target: <= 1.3x.

  python benchmarks/moe_step.py [--rounds 5] [--steps 5] [--preset t5.1.1-small] [--batch 8] [--group_size 128]

Expert parallelism: the two ways of feeding experts sharded over the mesh axis `expert` (T5Config's
moe.expert_parallel), against each other on host devices (the script asks XLA for as many as the mesh has):

  python benchmarks/moe_step.py --mesh=data=2,expert=4 --expert_parallel=both --group_size 128

Both models are configs/moe.py's (the default: configs/base.py's tiny T5.1.1, batch 32 x 128); `--preset`
swaps in a real size. Batches are random token ids of the configured shapes; the steps are the ones
`t5jax.setup.build` compiles for training.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package


def parse_args(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--preset", default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--group_size", type=int, default=None, help="moe.group_size (default: configs/moe.py's)")
  parser.add_argument("--mesh", default="", help="e.g. data=2,expert=4 (default: configs/moe.py's, all data)")
  parser.add_argument(
    "--expert_parallel",
    default=None,
    choices=("annotations", "all_to_all", "both"),
    help="MoE's moe.expert_parallel; 'both' times the two against each other (no dense run)",
  )
  args = parser.parse_args(argv)
  args.mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(",") if item)}
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS and ARGS.mesh and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Host devices must be asked for before jax starts.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={math.prod(ARGS.mesh.values())}"
  )

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import moe  # noqa: E402
from t5jax import parallel, setup  # noqa: E402


def cpu_name():
  for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def build(num_experts, args, expert_parallel=None):
  config = moe.get_config()
  if args.group_size:
    config.model.moe.group_size = args.group_size
  if args.preset:
    from t5jax.model import get_preset

    config.model.update(get_preset(args.preset))
  config.model.moe.num_experts = num_experts
  if expert_parallel:
    config.model.moe.expert_parallel = expert_parallel
  if args.batch:
    config.batch_size = args.batch
  if args.mesh:
    config.mesh.update(dict(dict(data=1, fsdp=1, tensor=1, expert=1), **args.mesh))
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh):
    run = setup.build(config, mesh)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(3, 1000, x.shape).astype(x.dtype) for k, x in run.batch_spec.items()}
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_loss_weights"])
    step = run.compile_train_step()
    return run.init_state(), step, parallel.host_to_global(batch, run.batch_sharding), mesh


def seconds_per_step(state, step, batch, steps):
  state, m = step(state, batch)  # warm
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - start) / steps


def main(args):
  if args.expert_parallel == "both":
    variants = {"annotations": (8, "annotations"), "all_to_all": (8, "all_to_all")}
  else:
    variants = {"dense": (0, None), "moe8": (8, args.expert_parallel)}
  runs = {name: list(build(n, args, ep)) for name, (n, ep) in variants.items()}
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, r in runs.items():
      with parallel.use_mesh(r[3]):
        r[0], t = seconds_per_step(r[0], r[1], r[2], args.steps)
      times[name].append(t)
  (base, base_ts), (other, other_ts) = times.items()
  ratios = [o / b for o, b in zip(other_ts, base_ts, strict=True)]
  mesh = ", ".join(f"{k}={v}" for k, v in runs[base][3].shape.items() if v > 1) or "1 device"
  print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); model {args.preset or 'configs/base.py tiny'}; mesh {mesh}")
  for name, ts in times.items():
    print(f"  {name:11s} {statistics.median(ts) * 1e3:8.1f} ms/step (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
  print(
    f"  {other} / {base}: median {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})"
  )


if __name__ == "__main__":
  main(ARGS)

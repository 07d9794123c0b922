r"""Dense against blockwise attention in the whole T5.1.1-small train step, at growing input lengths.

For each length, both implementations' train steps (configs/base.py at t5.1.1-small, span corruption, batch
1) are compiled ahead of time here, and XLA's `memory_analysis()` gives their temporary bytes (deterministic:
one run is the figure). (Not FLOPs: XLA's cost analysis counts a loop's body once, and blockwise attention is
two loops.) At the `--time` lengths both steps also run, in alternating rounds (the machine is shared: the
ratio per round is the figure, with the CPU named).

  python benchmarks/attention.py [--lengths 512,2048,8192,16384] [--time 512] [--rounds 5] [--block 512]
      [--remat full] [--scan_layers]

A length whose dense step needs more than `--limit_gib` (16) of temporaries is reported as not fitting.

`--skipping L` times blockwise attention alone (forward + backward, T5.1.1-small's 6 heads of 64, batch 1) at
L tokens three ways, in alternating rounds: every tile live (bidirectional, no padding), causal (the tiles above
the diagonal skipped) and the keys' second half padding (the tiles of those key blocks skipped).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from t5jax import parallel, setup  # noqa: E402

IMPLS = ("dense", "blockwise")


def cpu_name():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except (OSError, StopIteration):
    name = platform.processor() or "unknown CPU"
  return f"{name} ({os.cpu_count()} cores)"


def build(length, impl, args):
  config = base.get_config(args.preset)
  config.batch_size = 1
  config.data.inputs_length = length
  config.model.update(attention_impl=impl, attention_block_q=args.block, attention_block_k=args.block)
  config.model.remat_policy = args.remat
  config.model.scan_layers = args.scan_layers
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  with parallel.use_mesh(mesh):
    run = setup.build(config, mesh)
    compiled = run.compile_train_step()
  return run, compiled


def time_steps(runs, rounds, steps):
  """{impl: [ms per step, per round]}, the implementations alternating within each round."""
  states, batches = {}, {}
  for impl, (run, _) in runs.items():
    with parallel.use_mesh(run.mesh):
      states[impl] = run.init_state(seed=0)
      rng = np.random.default_rng(0)
      batch = {k: rng.integers(1, 300, v.shape).astype(v.dtype) for k, v in run.batch_spec.items()}
      batches[impl] = parallel.host_to_global(batch, run.batch_sharding)
  times = {impl: [] for impl in runs}
  for _ in range(rounds + 1):  # the first round warms up
    for impl, (_, compiled) in runs.items():
      start = time.perf_counter()
      for _ in range(steps):
        states[impl], m = compiled(states[impl], batches[impl])
      jax.block_until_ready(m)
      times[impl].append((time.perf_counter() - start) / steps * 1e3)
  return {impl: t[1:] for impl, t in times.items()}


def time_tile_skipping(length, args):
  """{pattern: [ms of blockwise forward + backward, per round]} for the three patterns of `--skipping`."""
  import jax.numpy as jnp

  from t5jax.model import blockwise

  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(1, length, 6, 64)] + [(1, 6, length, 64)] * 2
  )
  table = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  half = jnp.arange(length)[None] < length // 2
  patterns = {"all tiles": (False, None), "causal": (True, None), "half padding": (False, half)}
  steps = {}
  for name, (causal, valid) in patterns.items():
    p = blockwise.Pattern(table, None, None, valid, None, None, causal=causal, bidirectional=not causal)
    p = p.replace(block_q=args.block, block_k=args.block)
    loss = lambda q, k, v, t, p=p: jnp.sum(blockwise.attention(q, k, v, p.replace(table=t)))  # noqa: E731
    steps[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    jax.block_until_ready(steps[name](q, k, v, table))  # compile
  times = {name: [] for name in patterns}
  for _ in range(args.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v, table))
      times[name].append((time.perf_counter() - start) * 1e3)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="512,2048,8192,16384")
  parser.add_argument("--time", default="512", help="lengths whose steps are also run and timed")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--block", type=int, default=512, help="attention_block_q = attention_block_k")
  parser.add_argument("--preset", default="t5.1.1-small")
  parser.add_argument("--limit_gib", type=float, default=16.0)
  parser.add_argument("--remat", default="none", help="model.remat_policy of both: none | full | dots")
  # XLA:CPU's schedule keeps unrolled layers' recomputed activations alive until the weight gradients at the end
  # of the step, so remat only lowers the temporaries with the layers in one scan (one layer's backward a step).
  parser.add_argument("--scan_layers", action="store_true", help="model.scan_layers of both")
  parser.add_argument("--skipping", type=int, default=0, help="time tile skipping at this length (no steps)")
  args = parser.parse_args()
  if args.skipping:
    times = time_tile_skipping(args.skipping, args)
    full = times["all tiles"]
    print(f"CPU: {cpu_name()}; blockwise attention alone at {args.skipping} tokens, blocks {args.block}")
    for name, t in times.items():
      ratios = [a / b for a, b in zip(t, full, strict=True)]
      print(
        f"  {name}: {statistics.median(t):.0f} ms, / all tiles {statistics.median(ratios):.2f} (per round "
        f"{', '.join(f'{r:.2f}' for r in ratios)})"
      )
    return
  timed = {int(x) for x in args.time.split(",") if x}
  print(
    f"CPU: {cpu_name()}; {args.preset}, batch 1, span corruption; blocks {args.block} x {args.block}; "
    f"remat {args.remat}{', scanned layers' if args.scan_layers else ''}"
  )
  print("| inputs | dense temporaries | blockwise temporaries | blockwise / dense | fits in 16 GiB |")
  print("|---|---|---|---|---|")
  for length in (int(x) for x in args.lengths.split(",")):
    runs = {impl: build(length, impl, args) for impl in IMPLS}
    dt, bt = (runs[impl][1].memory_analysis().temp_size_in_bytes for impl in IMPLS)
    fits = " / ".join(
      f"{impl} {'yes' if t <= args.limit_gib * 2**30 else 'no'}" for impl, t in zip(IMPLS, (dt, bt), strict=True)
    )
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"| {length} | {gib(dt)} | {gib(bt)} | {bt / dt:.3f} | {fits} |", flush=True)
    if length in timed:
      times = time_steps(runs, args.rounds, args.steps)
      ratios = [b / d for b, d in zip(times["blockwise"], times["dense"], strict=True)]
      print(
        f"  step at {length}: dense {statistics.median(times['dense']):.0f} ms, blockwise "
        f"{statistics.median(times['blockwise']):.0f} ms; blockwise / dense median {statistics.median(ratios):.2f} "
        f"(per round {', '.join(f'{r:.2f}' for r in ratios)})",
        flush=True,
      )


if __name__ == "__main__":
  main()

r"""The top ops of t5jax's forward+backward by time: a `jax.profiler` trace joined with XLA's optimized HLO.

  python benchmarks/profile_step.py [--preset=t5.1.1-small] [--batch=8] [--top=10] [--out=/tmp/t5jax_profile]
  python benchmarks/profile_step.py --overrides='{"model.scan_layers": true}'   # another training path
  python benchmarks/profile_step.py --preset=t5.1.1-base --batch=64 --dtype=bfloat16 --steps=3 --out=DIR  # a GPU

Runs `jax.value_and_grad` of the summed cross-entropy once under `jax.profiler.trace` (a Perfetto trace, the
same data xprof shows), with the compiled HLO dumped beside it. Each traced op is named by its HLO instruction;
the dump gives that instruction's shape and the JAX source op (`op_name` metadata). Prints the top ops, then
time by source op with the layers merged ("fwd"/"bwd" from whether the op sits under autodiff's transpose),
then the split between matmuls and everything else. `--steps` traces that many calls (the tables sum them);
on a GPU the trace's kernels are named by their HLO op as on the CPU, and the trace stays in OUT/trace for
xprof or Perfetto whatever the tables find.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys


def profile(args):
  """Traces one forward+backward; returns the trace events and the optimized HLO text of that program."""
  os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.out}/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE"
  )
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_throughput import bench_config, make_batch

  from t5jax import losses, parallel, setup

  config, targets_length = bench_config(args, json.loads(args.overrides))
  batch = jax.tree.map(jnp.asarray, make_batch(args.batch, args.inputs_length, targets_length, config.model.vocab_size))
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run_setup = setup.build(config, mesh)
    params = run_setup.init_state()["params"]

  def profiled_loss(p, b):
    model_args, kwargs = run_setup.model.batch_inputs(b)
    logits = run_setup.model.apply({"params": p}, *model_args, **kwargs)
    return losses.loss_sums(logits, b["decoder_target_tokens"], b["decoder_loss_weights"])["loss_sum"]

  grad = jax.jit(jax.value_and_grad(profiled_loss))
  jax.block_until_ready(grad(params, batch))  # compile and warm up outside the trace
  with jax.profiler.trace(f"{args.out}/trace", create_perfetto_trace=True):
    for _ in range(args.steps):
      jax.block_until_ready(grad(params, batch))
  trace = glob.glob(f"{args.out}/trace/**/*perfetto_trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(trace))
  # The dump's name carries the backend: jit_profiled_loss.cpu_after_optimizations.txt, or ..._gpu_... .
  hlo = glob.glob(f"{args.out}/hlo/*jit_profiled_loss.*after_optimizations.txt")[0]
  return events["traceEvents"] if isinstance(events, dict) else events, open(hlo).read()


def summarize(events, hlo, top):
  """Prints the tables of the module docstring from the trace events and the HLO text."""
  meta = {
    m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\s+%?(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", hlo, re.M)
  }
  by_op, by_source = collections.Counter(), collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op")
    if e.get("ph") == "X" and op:
      by_op[op] += e["dur"]
      source = re.sub(r"layers_\d+", "layers_N", meta.get(op, ("", "?"))[1])
      direction = "bwd" if "transpose(" in source else "fwd"
      by_source[f"{direction} {'/'.join(source.split('/')[-2:])}"] += e["dur"]
  total = sum(by_op.values())
  if not total:
    print("no event of the trace names an HLO op: read the trace itself (xprof, Perfetto)")
    return
  print(f"op time in all: {total / 1e3:,.0f} ms (ops on every core or stream summed)")
  print("\n| ms | % | HLO op | shape | JAX op |\n|---|---|---|---|---|")
  for op, t in by_op.most_common(top):
    shape, source = meta.get(op, ("?", "?"))
    print(f"| {t / 1e3:,.0f} | {t / total:.1%} | {op} | `{shape.split('{')[0]}` | {source.split('jvp(T5)/')[-1]} |")
  print("\n| ms | % | source op (layers merged) |\n|---|---|---|")
  for name, t in by_source.most_common(top):
    print(f"| {t / 1e3:,.0f} | {t / total:.1%} | {name} |")
  split = collections.Counter()
  for name, t in by_source.items():
    split[name.split()[0], "matmul" if "dot_general" in name else "other"] += t
  print("\n" + " | ".join(f"{d} {kind} {t / 1e3:,.0f} ms" for (d, kind), t in sorted(split.items())))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="t5.1.1-small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the step's compute dtype")
  parser.add_argument("--steps", type=int, default=1, help="forward+backward calls traced")
  parser.add_argument("--top", type=int, default=10)
  parser.add_argument("--out", default="/tmp/t5jax_profile")
  parser.add_argument(
    "--overrides",
    default="{}",
    help="config overrides as JSON, e.g. '{\"model.scan_layers\": true}' to profile another path",
  )
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  summarize(*profile(args), args.top)


if __name__ == "__main__":
  main()

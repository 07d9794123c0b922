r"""HF checkpoint import: t5jax.from_pretrained vs transformers' from_pretrained, time and peak RSS.

  python benchmarks/hf_import.py [--preset t5.1.1-base] [--rounds 3] [--dir DIR]

Builds a random T5.1.1-base-shaped checkpoint with transformers (save_pretrained, no download) in a temp
dir, then loads it in fresh subprocesses, alternating ours and transformers each round so machine noise
hits both alike. Each child reports its own peak RSS (ru_maxrss) and the load time after its imports; the
RSS after imports is reported too, since jax and torch alone take hundreds of MB. Target: our peak RSS
<= 2.5x the checkpoint file size.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each child: import, note RSS, load (forcing every array to exist), print timings and RSS as JSON.
CHILD = r"""
import json, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
if which == "t5jax":
  import jax, t5jax
else:
  import torch, transformers
def hwm():   # peak RSS in bytes: ru_maxrss, or the mm's VmHWM if larger (both are peaks)
  with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
  return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, vm)
base = hwm()
start = time.perf_counter()
if which == "t5jax":
  _, params, _ = t5jax.from_pretrained(path)
  jax.block_until_ready(params)
  n = sum(x.size for x in jax.tree.leaves(params))
else:
  model = transformers.T5ForConditionalGeneration.from_pretrained(path)
  # transformers may leave weights memory-mapped and unread; touch each so both sides end fully loaded.
  n = sum(p.numel() for p in model.parameters() if float(p.detach().sum()) is not None)
seconds = time.perf_counter() - start
peak = hwm()
print(json.dumps({"seconds": seconds, "peak": peak, "base": base, "params": int(n)}))
"""


def build_checkpoint(directory, preset):
  import torch
  import transformers

  from t5jax.model import get_preset

  p = get_preset(preset)
  torch.manual_seed(0)
  config = transformers.T5Config(
    vocab_size=p["vocab_size"],
    d_model=p["d_model"],
    d_kv=p["d_kv"],
    d_ff=p["d_ff"],
    num_layers=p["num_encoder_layers"],
    num_decoder_layers=p["num_decoder_layers"],
    num_heads=p["num_heads"],
    feed_forward_proj=p["feed_forward_proj"],
    tie_word_embeddings=p["tie_word_embeddings"],
    dropout_rate=0.0,
  )
  model = transformers.T5ForConditionalGeneration(config)
  if not p["tie_word_embeddings"]:  # transformers v5 ties lm_head; T5.1.1 checkpoints carry their own
    model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * 0.03)
  model.save_pretrained(directory)


def measure(which, path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True, env=env, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["wall"] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t5.1.1-base")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default=None, help="reuse (or create) the checkpoint here instead of a temp dir")
  parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: the building child
  args = parser.parse_args()
  if args.build:
    sys.path.insert(0, ROOT)
    return build_checkpoint(args.build, args.preset)
  with tempfile.TemporaryDirectory() as tmp:
    path = args.dir or tmp
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
      t = time.perf_counter()
      # In a child: ru_maxrss survives fork+exec, so a big parent would inflate every measurement after it.
      subprocess.run([sys.executable, __file__, "--build", path, "--preset", args.preset], check=True)
      print(f"built a random {args.preset} checkpoint in {time.perf_counter() - t:.0f} s: {path}")
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    runs = {"t5jax": [], "transformers": []}
    for r in range(args.rounds):
      for which in runs:  # interleaved: ours, theirs, ours, theirs, ...
        runs[which].append(measure(which, path))
        m = runs[which][-1]
        print(
          f"round {r}: {which:12s} load {m['seconds']:6.2f} s  peak RSS {m['peak'] / 2**20:7.0f} MiB "
          f"(after imports {m['base'] / 2**20:5.0f} MiB)",
          flush=True,
        )
    print(
      f"\n{args.preset}: {runs['t5jax'][0]['params']:,} params, model.safetensors {size / 2**20:.0f} MiB; "
      f"medians over {args.rounds} rounds"
    )
    med = {
      w: {k: statistics.median(m[k] for m in ms) for k in ("seconds", "peak", "base", "wall")} for w, ms in runs.items()
    }
    for which, m in med.items():
      print(
        f"  {which:12s} load {m['seconds']:6.2f} s (process {m['wall']:5.1f} s)  peak RSS "
        f"{m['peak'] / 2**20:6.0f} MiB = {m['peak'] / size:.2f}x file  (after imports "
        f"{m['base'] / 2**20:4.0f} MiB; load adds {(m['peak'] - m['base']) / size:.2f}x file)"
      )
    ours, theirs = med["t5jax"], med["transformers"]
    print(
      f"  ratio t5jax/transformers: load time {ours['seconds'] / theirs['seconds']:.2f}x, "
      f"peak RSS {ours['peak'] / theirs['peak']:.2f}x"
    )
    print(
      f"  target peak RSS <= 2.5x file: {'met' if ours['peak'] <= 2.5 * size else 'NOT met'} "
      f"({ours['peak'] / size:.2f}x)"
    )


if __name__ == "__main__":
  main()

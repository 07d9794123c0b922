r"""Crash-resume at random moments: SIGKILL a training run at random points (mid-step, mid-async-save, with
loader worker processes running), rerun the same command, and count how many resumes end bitwise identical
to a run that was never interrupted (every logged loss and grad norm, and every final param).

  python benchmarks/kill_resume.py [--points 20] [--seed 0] [--moe] [--workdir /tmp/t5jax_kill_resume]

The run is configs/base.py at a tiny size on a generated corpus, saving a checkpoint at every step (async)
so that most kills land in the middle of a save; `--moe` gives it experts with router jitter. The tests
(tests/test_train.py, tests/test_moe_checkpoints.py) kill each model kind once, at a fixed step; the random
moments are this script's.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5jax.workdir import checkpoint  # noqa: E402
from t5jax.data import sources  # noqa: E402
from t5jax.metrics import read_metrics  # noqa: E402

TINY = [
  "--config.data.tokenizer.spm_vocab_size=1000",
  "--config.data.inputs_length=32",
  "--config.model.vocab_size=1152",
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.d_kv=16",
  "--config.model.d_ff=64",
  "--config.model.num_encoder_layers=2",
  "--config.model.num_decoder_layers=2",
  "--config.batch_size=8",
  "--config.eval_steps=2",
  "--config.total_steps=30",
  "--config.log_every=1",
  "--config.eval_every=15",
  "--config.checkpoint_every=1",
  "--config.keep_checkpoints=2",
  "--config.data.num_workers=2",
]
# Experts in every decoder FFN and every second encoder one; router jitter, so the resumed rng matters too.
MOE = [
  f"--config={ROOT}/configs/moe.py:4",
  "--config.model.moe.every_encoder=2",
  "--config.model.moe.every_decoder=1",
  "--config.model.moe.jitter=0.1",
]


def command(workdir, corpus, *extra):
  """The run's command; `extra` flags override TINY's (e.g. MOE: a `--config=` among them replaces base.py)."""
  named = [f for f in extra if f.startswith("--config=")]
  return [
    sys.executable,
    "-m",
    "t5jax.train",
    named[-1] if named else f"--config={ROOT}/configs/base.py",
    f"--workdir={workdir}",
    f"--config.data.source.text_glob={corpus}",
    *TINY,
    *(f for f in extra if f not in named),
  ]


def outcome(workdir):
  """(logged losses and grad norms by step, final params as numpy) of a finished run."""
  rows = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r}
  params, _ = checkpoint.load_params(os.path.join(workdir, "checkpoints"))
  return rows, params


def same(a, b):
  import jax

  (rows_a, params_a), (rows_b, params_b) = a, b
  return rows_a == rows_b and all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True)
  )


def _logged_steps(metrics):
  return [r["step"] for r in read_metrics(metrics)] if os.path.exists(metrics) else []


def kill_and_resume(workdir, corpus, delay_s, *extra, after_step=1):
  """Starts the run, SIGKILLs it `delay_s` after it logs step `after_step`, reruns it to the end. Returns the
  step it was killed after (None if it finished first)."""
  proc = subprocess.Popen(
    command(workdir, corpus, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  while proc.poll() is None and max(_logged_steps(metrics), default=0) < after_step:
    time.sleep(0.01)
  time.sleep(delay_s)
  killed = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_after = max(_logged_steps(metrics), default=0) if killed else None
  out = subprocess.run(command(workdir, corpus, *extra), cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"resume failed: {out.stderr[-2000:]}")
  return killed_after


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--points", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--moe", action="store_true", help="a mixture-of-experts model (MOE's flags)")
  parser.add_argument("--workdir", default="/tmp/t5jax_kill_resume")
  args = parser.parse_args()
  extra = MOE if args.moe else []
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  corpus = os.path.join(args.workdir, "corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:  # a few hundred KB of real text, one document per line
    f.write("\n".join(sources.stdlib_documents(max_files=60)) + "\n")
  start = time.monotonic()
  subprocess.run(command(f"{args.workdir}/reference", corpus, *extra), cwd=ROOT, check=True, capture_output=True)
  reference = outcome(f"{args.workdir}/reference")
  run_s = time.monotonic() - start
  delays = np.random.default_rng(args.seed).uniform(0, run_s / 2, args.points)  # training is ~the 2nd half
  exact = 0
  for i, delay in enumerate(delays):
    workdir = f"{args.workdir}/point{i}"
    killed_after = kill_and_resume(workdir, corpus, float(delay), *extra)
    ok = same(outcome(workdir), reference)
    exact += ok
    print(
      f"point {i:2d}: killed {delay:5.2f} s after step 1 (logged through step {killed_after}): "
      f"{'exact' if ok else 'DIFFERENT'}",
      flush=True,
    )
  print(f"{exact}/{args.points} resumed bitwise exactly (losses, grad norms and final params)")


if __name__ == "__main__":
  main()

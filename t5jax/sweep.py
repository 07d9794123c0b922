r"""Runs an experiment sweep: every point of a grid of config overrides, each in its own workdir.

  python -m t5jax.sweep experiments/NAME.py [--dry_run] [--launch="local"] [--workdir_root=workdirs]

An experiment file defines:
  CONFIG = "configs/base.py"          the base config (a path, relative to the repository root)
  FLAGS = ["--config.total_steps=200"] overrides shared by every point (optional)
  GRID = {"optimizer.name": [...], "optimizer.learning_rate": [...]}   the cross product is swept, or
  POINTS = [{"optimizer.name": "adamw", ...}, ...]                     an explicit list of points.
  PLOT = "cross_entropy"              the train metric loss_curves.png shows (optional; default "loss")
  ENTRY = "t5jax.distill"             the module each point runs (optional; default t5jax.train)

Each point trains through `launch.sh MODE CONFIG --workdir=ROOT/NAME/POINT --config.k=v ...`: `local` runs
them one after another here; e.g. `--launch="slurm 1 8"` submits one job per point on a cluster (rerun the
sweep once they finish to collect the results). A point whose workdir already logged its last step is
skipped, so a rerun resumes the sweep. Then results.csv, results.md, eval_loss_by_step.md, loss_curves.png
(train loss) and eval_loss_curves.png are written next to the experiment file, in experiments/NAME/.
"""

import csv
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from t5jax import cli, storage
from t5jax.metrics import plot_curves, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command instead of running it.")
_LAUNCH = flags.DEFINE_string("launch", "local", "launch.sh mode and its arguments before CONFIG.")
_WORKDIR_ROOT = flags.DEFINE_string(
  "workdir_root", os.path.join(ROOT, "workdirs"), "Where point workdirs go: a local folder or gs://bucket/path."
)


def load_experiment(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no experiment file {path}")
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if hasattr(module, "GRID") == hasattr(module, "POINTS"):
    raise ValueError(f"{path} must define exactly one of GRID or POINTS")
  return module


def points(experiment):
  """[(name, {key: value})]: the grid's cross product in order, or the explicit points."""
  if hasattr(experiment, "POINTS"):
    overrides = [dict(p) for p in experiment.POINTS]
  else:
    keys = list(experiment.GRID)
    overrides = [dict(zip(keys, values, strict=True)) for values in itertools.product(*experiment.GRID.values())]
  # Names become directory names: keep them to characters every filesystem and Orbax path accepts.
  name = lambda o: re.sub(r"[^A-Za-z0-9._-]", "", "_".join(f"{k.split('.')[-1]}-{v}" for k, v in o.items()))  # noqa: E731
  return [(name(o), o) for o in overrides]


def total_steps(experiment, overrides):
  """The point's last step, as its flags set it (needed to tell a finished point)."""
  for k, v in overrides.items():
    if k == "total_steps":
      return int(v)
  for flag in reversed(getattr(experiment, "FLAGS", [])):
    if flag.startswith("--config.total_steps="):
      return int(flag.split("=", 1)[1])
  raise ValueError("the sweep must fix total_steps (in FLAGS or the grid) to tell finished points")


def finished(workdir, steps):
  path = os.path.join(workdir, "metrics.jsonl")
  return storage.exists(path) and any(r["step"] >= steps and "loss" in r for r in read_metrics(path))


def command(experiment, workdir, overrides):
  config = os.path.join(ROOT, experiment.CONFIG)
  entry = getattr(experiment, "ENTRY", None)
  return [
    *(["env", f"ENTRY={entry}"] if entry else []),
    os.path.join(ROOT, "launch.sh"),
    *shlex.split(_LAUNCH.value),
    config,
    f"--workdir={workdir}",
    *getattr(experiment, "FLAGS", []),
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]


def summarize(workdir):
  """(the point's figures, its train rows, its eval rows); the last decoded eval's metrics (tasks configs:
  `decode_<task>_exact_match`, ...) join the figures."""
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval_loss" in r]
  decoded = [{k: v for k, v in r.items() if k.startswith("decode_")} for r in rows]
  decoded = [d for d in decoded if d]
  return (
    {
      "final_loss": train[-1]["loss"],
      "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
      "eval_accuracy": evals[-1]["eval_accuracy"] if evals else float("nan"),
      "tokens_per_s": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
      **(decoded[-1] if decoded else {}),
    },
    train,
    evals,
  )


def write_results(out_dir, results, plot="loss"):
  """results.csv, results.md (sorted by eval loss), eval_loss_by_step.md, loss_curves.png (the train metric
  `plot` by step) and eval_loss_curves.png."""
  os.makedirs(out_dir, exist_ok=True)
  keys = sorted({k for _, overrides, *_ in results for k in overrides})
  decoded = sorted({k for _, _, s, *_ in results for k in s if k.startswith("decode_")})
  columns = keys + ["final_loss", "eval_loss", "eval_accuracy", *decoded, "tokens_per_s"]
  table = [{**{k: o.get(k, "") for k in keys}, **{k: float("nan") for k in decoded}, **s} for _, o, s, *_ in results]
  table.sort(key=lambda r: r["eval_loss"])
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(table)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for r in table:
      f.write("| " + " | ".join(fmt(r[c]) for c in columns) + " |\n")
  _write_eval_table(os.path.join(out_dir, "eval_loss_by_step.md"), results)
  plot_curves(
    os.path.join(out_dir, "loss_curves.png"),
    {name: [(r["step"], r[plot]) for r in train] for name, _, _, train, _ in results},
    f"{os.path.basename(out_dir)}: train {plot.replace('_', ' ')}",
  )
  plot_curves(
    os.path.join(out_dir, "eval_loss_curves.png"),
    {name: [(r["step"], r["eval_loss"]) for r in evals] for name, _, _, _, evals in results},
    f"{os.path.basename(out_dir)}: eval loss",
  )


def _write_eval_table(path, results):
  """Eval loss at every eval step, one column per point."""
  curves = {name: {r["step"]: r["eval_loss"] for r in evals} for name, _, _, _, evals in results}
  steps = sorted({s for c in curves.values() for s in c})
  with open(path, "w") as f:
    f.write("| step | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves) + "\n")
    for step in steps:
      f.write(f"| {step} | " + " | ".join(f"{c[step]:.4f}" if step in c else "" for c in curves.values()) + " |\n")


def run(path):
  experiment = load_experiment(path)
  workdir_root = storage.check(_WORKDIR_ROOT.value, "--workdir_root")
  name = os.path.splitext(os.path.basename(path))[0]
  out_dir = os.path.join(os.path.dirname(os.path.abspath(path)), name)
  results, pending = [], 0
  for point, overrides in points(experiment):
    workdir = os.path.join(workdir_root, name, point)
    cmd = command(experiment, workdir, overrides)
    if _DRY_RUN.value:
      print(shlex.join(cmd))
      continue
    if finished(workdir, total_steps(experiment, overrides)):
      print(f"[{point}] finished before; skipped", flush=True)
    else:
      print(f"[{point}] {shlex.join(cmd)}", flush=True)
      # launch.sh runs $PYTHON: the interpreter running this sweep, unless the caller chose another.
      env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
      if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        raise ValueError(f"point {point} failed (workdir {workdir})")
    if finished(workdir, total_steps(experiment, overrides)):
      results.append((point, overrides, *summarize(workdir)))
    else:
      pending += 1  # submitted to a cluster, not done yet
  if results and not _DRY_RUN.value:
    write_results(out_dir, results, getattr(experiment, "PLOT", "loss"))
    print(
      f"{len(results)} points written to {out_dir}/results.md"
      + (f"; {pending} still running: rerun the sweep to collect them" if pending else "")
    )


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m t5jax.sweep experiments/NAME.py [--dry_run]")
  run(argv[1])


if __name__ == "__main__":
  cli.run(main, "t5jax.sweep")

r"""UL2's mixture of denoisers against T5's span corruption (issue 29): the same tiny T5.1.1 pretrained both
ways at equal steps, batch and encoder tokens, each then fine-tuned on configs/multitask.py's synthetic tasks;
a third copy is fine-tuned from scratch as the control.

  python -m experiments.ul2_vs_span [--root=workdirs/ul2_vs_span]

Two stages per model, so not a t5jax.sweep grid: this drives the CLIs (t5jax.train, t5jax.evaluate) through
subprocess and writes its tables with t5jax.sweep's writers, into experiments/ul2_vs_span/: results.md (exact
match per task after fine-tuning; each pretrained model's continuation accuracy on held-out text),
results.csv, eval_loss_by_step.md, eval_loss_curves.png and loss_curves.png (fine-tuning). A stage whose
workdir already finished is skipped, so a rerun resumes the experiment.

Pretraining: PRETRAIN_STEPS steps of batch 32 at 128 encoder tokens on the embedded corpus (span corruption's
decoder reads 29 tokens a row, UL2's 127). Fine-tuning keeps multitask.py's recipe (lr 0.02, rsqrt) at
FINETUNE_STEPS steps of batch 32 packed rows, with the pretrained model's own tokenizer and 4,224-id vocabulary
(the control uses the span run's tokenizer). The span model is asked for a continuation as T5 asks a
span-corruption model: prefix + <extra_id_0> + EOS, scored after the sentinel it answers with first.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

from t5jax import sweep
from t5jax.metrics import read_metrics

PRETRAIN_STEPS = 200
FINETUNE_STEPS = 300
PRETRAIN = {  # name -> (config, continuation eval flags)
  "span": ("configs/base.py", ["--config.data.ul2.mode_tokens=False", "--config.continuation_prompt=sentinel"]),
  "ul2": ("configs/ul2.py", []),
}
_ROOT = flags.DEFINE_string("root", os.path.join(sweep.ROOT, "workdirs", "ul2_vs_span"), "Where the workdirs go.")


def train(workdir, config, steps, *overrides):
  """Runs t5jax.train unless `workdir` finished already; its wall seconds, kept in WORKDIR/wall_seconds."""
  path = os.path.join(workdir, "wall_seconds")
  if sweep.finished(workdir, steps):
    print(f"[{os.path.basename(workdir)}] finished before; skipped", flush=True)
  else:
    flags_ = [f"--config={config}", f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.batch_size=32"]
    seconds = _run("t5jax.train", *flags_, f"--config.checkpoint_every={steps}", *overrides)
    with open(path, "w") as f:
      f.write(f"{seconds:.0f}\n")
  return float(open(path).read()) if os.path.isfile(path) else float("nan")


def _run(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  print(" ".join(cmd), flush=True)
  start = time.monotonic()
  subprocess.run(cmd, cwd=sweep.ROOT, check=True)
  return time.monotonic() - start


def continuation(workdir, eval_flags):
  """t5jax.evaluate's continuation metrics for a pretrained workdir, on configs/ul2.py's held-out text."""
  path = os.path.join(workdir, "eval_metrics.jsonl")
  if not read_metrics(path):
    _run("t5jax.evaluate", "--config=configs/ul2.py", f"--workdir={workdir}", *eval_flags)
  return read_metrics(path)[-1]


def num_params(workdir):
  import jax  # pylint: disable=import-outside-toplevel
  import t5jax  # pylint: disable=import-outside-toplevel

  params, _ = t5jax.load_checkpoint(workdir)
  return sum(x.size for x in jax.tree.leaves(params))


def main(argv):
  del argv
  root = _ROOT.value
  seconds, pretrained = {}, {}
  for name, (config, _) in PRETRAIN.items():
    workdir = os.path.join(root, f"pretrain_{name}")
    seconds[f"pretrain_{name}"] = train(workdir, config, PRETRAIN_STEPS, f"--config.eval_every={PRETRAIN_STEPS}")
    pretrained[name] = workdir
  rows = []
  for init in ("span", "ul2", "scratch"):
    workdir = os.path.join(root, f"finetune_{init}")
    source = pretrained.get(init, pretrained["span"])  # the control reads the span run's tokenizer
    weights = [f"--config.init_from={source}"] if init in pretrained else []
    seconds[f"finetune_{init}"] = train(
      workdir,
      "configs/multitask.py",
      FINETUNE_STEPS,
      *weights,
      f"--config.data.tokenizer.path={os.path.join(source, 'spiece.model')}",
      "--config.model.vocab_size=4224",
      "--config.eval_every=50",
      f"--config.decode_eval_every={FINETUNE_STEPS // 2}",
    )
    rows.append((f"init-{init}", {"init": init}, *sweep.summarize(workdir)))
  out_dir = os.path.join(sweep.ROOT, "experiments", "ul2_vs_span")
  sweep.write_results(out_dir, rows)
  scores = {name: continuation(workdir, PRETRAIN[name][1]) for name, workdir in pretrained.items()}
  with open(os.path.join(out_dir, "results.md"), "a") as f:
    f.write(pretraining_table(pretrained, scores, seconds))
  print(f"written to {out_dir}/results.md", flush=True)


def pretraining_table(pretrained, scores, seconds):
  """Markdown: each pretrained model's size, final losses and continuation scores, and every stage's wall time."""
  lines = [
    "\n| pretraining | params | steps x batch | final train loss | eval loss "
    "| continuation token accuracy | continuation exact match | examples |\n|---|---|---|---|---|---|---|---|\n"
  ]
  for name, workdir in pretrained.items():
    figures, s = sweep.summarize(workdir)[0], scores[name]
    lines.append(
      f"| {name} | {num_params(workdir):,} | {PRETRAIN_STEPS} x 32 | {figures['final_loss']:.3f} "
      f"| {figures['eval_loss']:.3f} | {s['decode_continuation_token_accuracy']:.2f} "
      f"| {s['decode_continuation_exact_match']:.2f} | {s['decode_continuation_num_examples']:.0f} |\n"
    )
  lines.append("\nWall seconds per training run: ")
  lines.append(", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
  return "".join(lines)


if __name__ == "__main__":
  app.run(main)

r"""Decodes each eval task of a config from a checkpoint and reports its metrics on the decoded text.

  python -m t5jax.evaluate --config=configs/multitask.py --workdir=DIR [--checkpoint_step=N]

Metrics (T5's, on a 0-100 scale): exact_match and accuracy, bleu (sacrebleu), rouge (rouge-score: rouge1,
rouge2, rougeLsum F-measures), pearson and spearman (stsb, on the floats parsed from the text). Results go
to the console, `DIR/eval_metrics.jsonl` (one row per evaluation) and TensorBoard (`DIR/tensorboard/eval`).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags
from tensorboardX import SummaryWriter

import t5jax
from t5jax import checkpoint as ckpt_lib
from t5jax import decode
from t5jax.data import mixtures, packing, pipeline
from t5jax.model import T5

# ---------------------------------------------------------------------------------------------------------
# Metrics: (targets, predictions) -> {name: value}; values postprocessed by the task (stsb: floats).


def exact_match(targets, predictions):
  return {"exact_match": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def accuracy(targets, predictions):
  return {"accuracy": exact_match(targets, predictions)["exact_match"]}


def bleu(targets, predictions):
  import sacrebleu
  # T5's settings: 13a tokenization, exponential smoothing, case-sensitive.
  return {"bleu": sacrebleu.corpus_bleu(predictions, [targets], smooth_method="exp", tokenize="13a").score}


def rouge(targets, predictions):
  from rouge_score import rouge_scorer, scoring
  types = ("rouge1", "rouge2", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
  agg = scoring.BootstrapAggregator()
  for t, p in zip(targets, predictions):
    # rougeLsum splits summaries into sentences on newlines, as T5 prepares them.
    agg.add_scores(scorer.score(t.replace(". ", ".\n"), p.replace(". ", ".\n")))
  result = agg.aggregate()
  return {k: 100.0 * result[k].mid.fmeasure for k in types}


def _correlation(kind, targets, predictions):
  from scipy import stats
  t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  if np.std(p) == 0 or np.std(t) == 0:
    return 0.0  # constant predictions: correlation undefined; report none rather than NaN
  fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
  return 100.0 * float(fn(t, p)[0])


def pearson(targets, predictions):
  return {"pearson": _correlation("pearson", targets, predictions)}


def spearman(targets, predictions):
  return {"spearman": _correlation("spearman", targets, predictions)}


METRICS = {"exact_match": exact_match, "accuracy": accuracy, "bleu": bleu, "rouge": rouge,
           "pearson": pearson, "spearman": spearman}


def compute_metrics(names, targets, predictions):
  out = {}
  for name in names:
    if name not in METRICS:
      raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
    out.update(METRICS[name](targets, predictions))
  return out


def _until_eos(ids, eos_id):
  ids = list(ids)
  return ids[: ids.index(eos_id)] if eos_id in ids else ids


def evaluate_tasks(model, params, data, *, num_examples=64, batch_size=64):
  """{task name: {metric: value}} for every task of `data` (a mixtures.TaskData), on the first
  `num_examples` records of each validation split, decoded greedily."""
  tok = data.tokenizer
  results = {}
  for i, (task, source) in enumerate(zip(data.tasks, data.eval_sources)):
    n = min(num_examples, len(source))
    tokenize = mixtures.Tokenize(task, i, tok, data.inputs_length, data.targets_length)
    examples = [tokenize(source[j]) for j in range(n)]
    targets, predictions = [], []
    for s in range(0, n, batch_size):
      chunk = examples[s:s + batch_size]
      inputs = packing.pad_examples([(x, y) for _, x, y in chunk], data.inputs_length,
                                    data.targets_length)["encoder_input_tokens"]
      out = np.asarray(decode.generate(model, params, inputs, inputs != 0, max_new_tokens=data.targets_length,
                                       eos_id=tok.eos_id))
      predictions += [tok.decode(_until_eos(row, tok.eos_id)) for row in out]
      targets += [tok.decode(_until_eos(y, tok.eos_id)) for _, _, y in chunk]
    post = task.postprocess or (lambda x: x)
    results[task.name] = compute_metrics(task.metrics, [post(t) for t in targets], [post(p) for p in predictions])
  return results


def flat_scalars(results):
  """{task: {metric: v}} -> {"decode_<task>_<metric>": v} for metrics.jsonl / TensorBoard."""
  return {f"decode_{task}_{name}": float(v) for task, m in results.items() for name, v in m.items()}


# ---------------------------------------------------------------------------------------------------------
# CLI.

def _define_flags():
  # Defined only when run as the CLI: train.py imports this module, and its own --config would clash.
  config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/multitask.py.")
  flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints/ and cache/).")
  flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate; default the latest.")


def run(config, workdir, step=None):
  if config.data.kind != "tasks":
    raise ValueError(f"config.data.kind={config.data.kind!r}: evaluate decodes task mixtures ('tasks')")
  directory = os.path.join(workdir, "checkpoints")
  if step is None:
    step = ckpt_lib.Checkpoints(directory).latest_step() if os.path.isdir(directory) else None
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
  params, model_config = t5jax.load_checkpoint(workdir, step)
  data = pipeline.from_config(config, os.path.join(workdir, "cache"))
  results = evaluate_tasks(T5(model_config), params, data, num_examples=config.decode_eval_examples)
  row = {"step": int(step), **flat_scalars(results)}
  with open(os.path.join(workdir, "eval_metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")
  tb = SummaryWriter(os.path.join(workdir, "tensorboard", "eval"))
  for k, v in row.items():
    if k != "step":
      tb.add_scalar(k, v, int(step))
  tb.close()
  for task, metrics in results.items():
    print(f"step {step} {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint_step)
  except (ValueError, FileNotFoundError) as e:
    print(f"t5jax.evaluate: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)

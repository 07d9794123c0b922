r"""Decodes each eval task of a config from a checkpoint and reports its metrics on the decoded text.

  python -m t5jax.evaluate --workdir=DIR [--config=configs/multitask.py] [--checkpoint_step=N]

Metrics: see `t5jax/evaluation.py`. Results go to the console, `DIR/eval_metrics.jsonl` (one row per
evaluation) and TensorBoard (`DIR/tensorboard/eval`). The tokenizer is the one the run recorded in DIR.
"""

import os

from absl import flags
import ml_collections
from ml_collections import config_flags

import t5jax
from t5jax import cli
from t5jax import evaluation, metrics as metrics_lib, seams, storage
from t5jax.workdir import checkpoint as ckpt_lib, record as workdir_lib
from t5jax.model import module_for


def run(config, workdir, step=None):
  evaluate = seams.kind(config).evaluate
  if evaluate is None:
    decoding = tuple(name for name, kind in seams.KINDS.items() if kind.evaluate is not None)
    raise ValueError(f"config.data.kind={config.data.kind!r}: evaluate decodes the kinds {decoding}")
  directory = os.path.join(workdir, "checkpoints")
  if step is None:
    if not ckpt_lib.complete_steps(directory):  # a listing: it may be training right now
      raise FileNotFoundError(f"no checkpoint in {directory}")
    step = ckpt_lib.complete_steps(directory)[-1]
  params, model_config = t5jax.load_checkpoint(workdir, step)
  # Exactly the tokenizer the run trained with (checked against its recorded hash), whatever the config says.
  config = config.copy_and_resolve_references()
  config.data.tokenizer.path = workdir_lib.load_run_tokenizer(workdir).model_path
  data = seams.kind(config).data(config, storage.local_cache(workdir))
  results = evaluate(module_for(model_config), params, data, config)
  writer = metrics_lib.MetricsWriter(workdir, filename="eval_metrics.jsonl", tensorboard="tensorboard/eval")
  writer.write(step, evaluation.flat_scalars(results))
  writer.close()
  for task, metrics in results.items():
    print(f"step {step} {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
  return results


def _define_flags():
  """The CLI's flags, defined only when run as a program: every CLI has its own --config."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file, e.g. configs/multitask.py; default: the config the run saved in WORKDIR/config.json.",
  )
  flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints/ and cache/).")
  flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate; default the latest.")


def main(argv):
  cli.check_args(argv, "workdir")
  FLAGS = flags.FLAGS
  config = FLAGS.config
  if config is None:
    config = ml_collections.ConfigDict(workdir_lib.read_record(FLAGS.workdir)["config"])
  run(config, FLAGS.workdir, FLAGS.checkpoint_step)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "t5jax.evaluate")

"""Whether a config may continue the run in a workdir: its settings against the run's record (config.json).

A workdir with a checkpoint continues only a run of the same model, data and optimizer. Settings that change
how long, how often or how fast it runs, but not what it learns from or what shapes it saves, may differ on a
resume (MAY_CHANGE); so may the learning-rate schedule, which a note reports. Any other change stops the run
before anything is built or written, naming the key, both values and what to do instead.
"""

import os

from t5jax import storage
from t5jax.workdir import checkpoint, record as workdir_lib

# Prefixes of the keys a resume may change: the length and the schedules of the run, throughput and memory
# (loader workers, the mesh and mode, microbatching, rematerialization), and init_from (unused on a resume).
MAY_CHANGE = (
  "total_steps",
  "log_every",
  "eval_every",
  "eval_steps",
  "checkpoint_every",
  "keep_checkpoints",
  "async_checkpoints",
  "decode_eval_every",
  "decode_eval_examples",
  "init_from",
  "grad_accum_steps",
  "mesh.",
  "parallel.mode",
  "data.num_workers",
  "data.video.index_workers",
  "data.video.timeout",
  "data.video.read_timeout",
  "model.remat_policy",
  "model.attention_",  # dense or blockwise, and its block sizes: the same function, computed another way
)
# The learning-rate schedule may change too (continuing with a lower rate is common), but it is reported.
SCHEDULE = ("optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps", "optimizer.end_lr_ratio")
# Why some refusals matter more than a shape: the reason given with the key.
WHY = {
  "batch_size": "the data position is counted in steps of batch_size examples, so another batch size "
  "would replay or skip data",
  "seed": "the seed fixes the data order and the dropout, so another one is a different run",
}


def check(config, workdir):
  """Raises a one-line ValueError if `config` may not continue the run in `workdir`; returns the notes (lines)
  that describe the allowed changes. A workdir without a checkpoint takes any config (nothing to lose)."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if storage.isfile(path) and not workdir_lib.is_run_record(workdir):
    raise ValueError(
      f"{path} is not a t5jax run's record (a Hugging Face model directory?); training here "
      f"would overwrite it: use a new --workdir, with --config.init_from={workdir} to start from "
      "its weights"
    )
  steps = checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))
  if not storage.isfile(path) or not steps:
    return []
  step = steps[-1]
  record = workdir_lib.read_record(workdir)["config"]
  recorded = _flatten(record)
  given = _flatten(workdir_lib.current_keys(config.to_dict()))
  # A key only this config has is a setting newer than the run, at its default. Both model sections are
  # complete (current_keys), so a model key on one side only is a group the other lacks: it counts.
  keys = list(recorded) + [k for k in given if k not in recorded and k.startswith("model.")]
  changed = [
    (k, recorded.get(k, "(absent)"), given.get(k, "(absent)"))
    for k in keys
    if _normal(recorded.get(k, "(absent)")) != _normal(given.get(k, "(absent)"))
  ]
  for key, old, new in changed:
    if not key.startswith(MAY_CHANGE + SCHEDULE):
      why = f" ({WHY[key]})" if key in WHY else ""
      raise ValueError(
        f"config.{key}={new!r} differs from {old!r} in the run that {workdir} holds{why}; "
        f"rerun with that run's settings ({path}), or train in a new --workdir (add "
        f"--config.init_from={workdir} to start from its weights)"
      )
  if not changed:
    return []
  notes = ["resuming with changed settings: " + ", ".join(f"config.{k} {old!r} -> {new!r}" for k, old, new in changed)]
  if any(k.startswith(SCHEDULE + ("total_steps",)) for k, _, _ in changed):
    notes += filter(None, [_schedule_note(config, record, step)])
  return notes


def _schedule_note(config, recorded_config, step):
  """A note when the learning rate at `step` differs between the recorded run's schedule and this one's
  (a new peak rate, or total_steps re-stretching a cosine or linear decay); None when it is the same."""
  import ml_collections
  from t5jax import optim

  old_cfg = ml_collections.ConfigDict(recorded_config)
  old = float(optim.make_schedule(old_cfg.optimizer, old_cfg.total_steps)(step))
  new = float(optim.make_schedule(config.optimizer, config.total_steps)(step))
  if abs(new - old) <= 1e-6 * max(abs(old), 1e-30):
    return None
  return f"the learning rate at step {step} is {new:.4g}, where the recorded run's schedule gives {old:.4g}"


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _normal(value):
  """JSON turns tuples into lists: compare as the record stores them."""
  return list(value) if isinstance(value, tuple) else value

r"""Trains T5 from a config file; a rerun with the same workdir resumes where the last one stopped.

  python -m t5jax.train --config=configs/base.py --workdir=DIR [--config.key=value ...]

The stages read top to bottom: config and workdir, data, model, optimizer, state (resume or init), the
jitted train step, then the loop with its logging, evaluation and checkpointing.
"""

import json
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

import t5jax
from t5jax import checkpoint as ckpt_lib
from t5jax import evaluate as evaluate_lib
from t5jax import losses
from t5jax import metrics as metrics_lib
from t5jax import optim
from t5jax import parallel
from t5jax.steps import make_eval_step, make_init_state, make_train_step
from t5jax.data import pipeline
from t5jax.model import T5, T5Config, param_axes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")


def git_hash():
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or "unknown"
  except OSError:
    return "unknown"


def check_config(config):
  """Rejects settings that would fail later, or silently do the wrong thing, with a one-line reason."""
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if config.init_from and not os.path.isdir(config.init_from):
    raise FileNotFoundError(f"config.init_from={config.init_from}: no such checkpoint directory")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")


class Preemption:
  """Turns SIGTERM (a scheduler's preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def initial_state(config, model_config, init_state, tx, abstract, state_sharding, rng, checkpoints, is_writer):
  """The latest checkpoint in the workdir if there is one, else a fresh init, with weights from
  `config.init_from` if set. Params are created already sharded (init under jit with out_shardings), so no
  device ever holds the whole model."""
  start = checkpoints.latest_step()
  if start is not None:
    state, meta = checkpoints.restore(start, parallel.with_shardings(abstract, state_sharding))
    assert meta["data_position"] == start, meta
    if is_writer:
      print(f"Resuming from step {start} ({checkpoints.directory}).", flush=True)
    return state
  state = jax.jit(init_state, out_shardings=state_sharding)(rng)
  if config.init_from:
    # Weights only (an imported HF checkpoint or another run); the optimizer state starts fresh for them.
    params = jax.device_put(t5jax.load_params_for(config.init_from, model_config, abstract["params"]),
                            state_sharding["params"])
    opt_state = jax.jit(tx.init, out_shardings=state_sharding["opt_state"])(params)
    state = dict(state, params=params, opt_state=opt_state)
    if is_writer:
      print(f"Initialized the weights from {config.init_from}.", flush=True)
  return state


def compile_steps(config, model, tx, schedule, mesh, abstract, state, state_sharding, batch_sharding, example):
  """The train step, compiled ahead for the state's and batch's shardings with the state donated (its
  buffers are reused for the new state), and the eval step. pmap mode wraps a per-device step with an
  explicit all-reduce in shard_map."""
  if config.parallel.mode == "pmap":
    step_fn = parallel.data_parallel(
        make_train_step(model, tx, schedule, config, data_axes=parallel.BATCH_AXES), mesh)
  else:
    step_fn = make_train_step(model, tx, schedule, config)
  metrics_sharding = parallel.replicated(mesh, jax.eval_shape(step_fn, abstract, example)[1])
  train_step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, metrics_sharding), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, config), out_shardings=NamedSharding(mesh, P()))
  return train_step.lower(state, example).compile(), eval_step


def run(config, workdir):
  # ---- Config and workdir: validated before anything is written, so a bad run leaves the workdir as it was.
  check_config(config)
  model_config = T5Config.from_dict(config.model.to_dict())
  model_config.validate()
  if config.parallel.mode not in ("jit", "pmap"):
    raise ValueError(f"config.parallel.mode={config.parallel.mode!r} is unknown; choose 'jit' or 'pmap'")
  mesh = parallel.make_mesh(config.mesh)
  parallel.activate(mesh, annotate=config.parallel.mode == "jit")
  batch_sharding = parallel.batch_sharding(mesh, config.batch_size)
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0

  # ---- Data: span-corrupted text (the embedded corpus, your files or TFDS) or a mixture of tasks; either
  # way batches are indexed by step, and each process reads only its rows of every global batch.
  data = pipeline.from_config(config, os.path.join(workdir, "cache"), jax.process_index(), jax.process_count())
  if model_config.vocab_size < data.tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary of {data.tokenizer.vocab_size} ids ({data.tokenizer.model_path})")

  # ---- Model and optimizer.
  model = T5(model_config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)

  init_state = make_init_state(model_config, tx)
  # ---- Shardings: params by their logical axes (pmap mode: replicated), optimizer state following them.
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init_state, rng)
  if config.parallel.mode == "pmap":
    state_sharding = parallel.replicated(mesh, abstract)
  else:
    params_sharding = parallel.param_shardings(mesh, param_axes(model_config))
    state_sharding = parallel.state_shardings(mesh, tx, abstract, params_sharding)

  # ---- State (resumed, or initialized sharded) and the compiled steps.
  checkpoints = ckpt_lib.Checkpoints(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
      async_save=config.async_checkpoints)
  state = initial_state(config, model_config, init_state, tx, abstract, state_sharding, rng, checkpoints,
                        is_writer)
  start = int(state["step"])
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  if is_writer:
    print(f"T5 with {num_params:,} params on mesh {dict(mesh.shape)} ({config.parallel.mode}); "
          f"training steps {start}..{config.total_steps}.", flush=True)

  example = parallel.host_to_global(data.train[0], batch_sharding)
  train_step, eval_step = compile_steps(config, model, tx, schedule, mesh, abstract, state, state_sharding,
                                        batch_sharding, example)
  tokens_per_batch = config.batch_size * sum(example[k].shape[1] for k in ("encoder_input_tokens",
                                                                           "decoder_target_tokens"))
  if is_writer:   # only now: a run that fails to start leaves the workdir's record as it was
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"config": config.to_dict(), "git": git_hash()}, f, indent=2)

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer, resume_step=start)
  progress = metrics_lib.Progress(config.total_steps, start, enabled=is_writer)
  preemption = Preemption()
  pending = []  # (step, device metrics) not yet read back: reading each step would stall the dispatch queue.
  last_flush = time.monotonic()

  def save(step):
    nonlocal last_flush
    flush(step)  # never save a state whose loss went non-finite
    checkpoints.save(step, state, {"data_position": step, "config": config.to_dict(), "git": git_hash()})
    last_flush = time.monotonic()  # tokens/s counts training time only

  def flush(step):
    """Reads back pending metrics, stops on a non-finite loss, and logs the interval's averages."""
    nonlocal pending, last_flush
    if not pending:
      return
    rows = jax.device_get(pending)
    pending = []
    for s, m in rows:
      if not np.isfinite(m["loss_sum"]):
        raise FloatingPointError(
            f"loss is {m['loss_sum']} at step {s}; stopping (last good checkpoint: step "
            f"{checkpoints.latest_step()} in {checkpoints.directory})")
    summed = {k: sum(m[k] for _, m in rows) for k in rows[0][1]}
    now = time.monotonic()
    scalars = losses.summarize(summed)
    scalars.update(lr=float(rows[-1][1]["lr"]), grad_norm=float(rows[-1][1]["grad_norm"]),
                   tokens_per_s=tokens_per_batch * len(rows) / max(now - last_flush, 1e-9))
    if hasattr(data, "num_malformed"):   # task mixtures: JSONL lines skipped when the sources were read
      scalars["malformed_lines_skipped"] = data.num_malformed
    last_flush = now
    writer.write(step, scalars)
    progress.report(step, scalars)

  def evaluate(step):
    nonlocal last_flush
    flush(step)
    summed = None
    for i in range(config.eval_steps):
      m = jax.device_get(eval_step(state["params"], parallel.host_to_global(data.eval[i], batch_sharding)))
      summed = m if summed is None else {k: summed[k] + m[k] for k in m}
    scalars = {f"eval_{k}": v for k, v in losses.summarize(summed).items()}
    writer.write(step, scalars)
    if is_writer:
      print(f"eval at step {step}: loss {scalars['eval_loss']:.4f} | accuracy {scalars['eval_accuracy']:.4f}",
            flush=True)
    last_flush = time.monotonic()

  def decode_eval(step):
    """Per-task metrics on decoded text (tasks configs): exact match, accuracy, BLEU, ROUGE, ..."""
    nonlocal last_flush
    flush(step)
    results = evaluate_lib.evaluate_tasks(model, state["params"], data, num_examples=config.decode_eval_examples)
    scalars = evaluate_lib.flat_scalars(results)
    writer.write(step, scalars)
    if is_writer:
      print(f"decoded eval at step {step}: " + " | ".join(f"{k} {v:.3f}" for k, v in scalars.items()), flush=True)
    last_flush = time.monotonic()

  # ---- The loop. Batch `step` is a pure function of (seed, step), so the data position is the step itself.
  step = start
  batches = pipeline.iterate_from(data.train, start, num_workers=config.data.num_workers)
  try:
    while step < config.total_steps:
      state, m = train_step(state, parallel.host_to_global(next(batches), batch_sharding))
      step += 1
      pending.append((step, m))
      if step % config.log_every == 0 or step == config.total_steps:
        flush(step)
      if step % config.eval_every == 0 or step == config.total_steps:
        evaluate(step)
      if config.decode_eval_every and (step % config.decode_eval_every == 0 or step == config.total_steps):
        decode_eval(step)
      if step % config.checkpoint_every == 0 or step == config.total_steps or preemption.requested:
        save(step)
      if preemption.requested:
        print(f"SIGTERM received: saved a checkpoint at step {step}; exiting.", flush=True)
        break
  finally:
    if hasattr(batches, "close"):
      batches.close()  # stops loader worker processes, if any
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  return state


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    timeout_s=_INIT_TIMEOUT.value)
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, ConnectionError) as e:
    print(f"t5jax.train: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

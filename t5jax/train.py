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
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

from t5jax import checkpoint as ckpt_lib
from t5jax import losses
from t5jax import metrics as metrics_lib
from t5jax import optim
from t5jax.data import pipeline
from t5jax.model import T5, T5Config, init_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")


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
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")


def make_train_step(model, tx, schedule, config):
  """The update for one global batch: microbatched gradients, one optimizer step, summed metrics."""
  deterministic = config.model.dropout_rate == 0.0
  normalizer = config.loss.normalizer or None

  def summed_loss(params, batch, rng):
    logits = model.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        deterministic=deterministic, rngs={"dropout": rng})
    _, m = losses.loss_and_metrics(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
        z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing)
    return m["loss_sum"], m

  grad_fn = jax.grad(summed_loss, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    k = config.grad_accum_steps
    if k == 1:
      grads, m = grad_fn(state["params"], batch, rng)
    else:
      # Gradient accumulation: scan over k microbatches so activations live for one microbatch at a time.
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        g, mm = grad_fn(state["params"], mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, mm)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state["params"], batch, rng))
      (grads, m), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    # Gradients of the summed loss, divided once by the batch's token count (or T5's constant).
    denominator = m["num_tokens"] if normalizer is None else jnp.float32(normalizer)
    grads = jax.tree.map(lambda g: g / jnp.maximum(denominator, 1.0), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
        "step": state["step"] + 1, "rng": state["rng"]}
    m = dict(m, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return new_state, m

  return train_step


def make_eval_step(model, config):
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    _, m = losses.loss_and_metrics(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss=config.loss.z_loss)
    return m
  return eval_step


class Preemption:
  """Turns SIGTERM (a scheduler's preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def run(config, workdir):
  # ---- Config and workdir: validated before anything is written, so a bad run leaves the workdir as it was.
  check_config(config)
  model_config = T5Config.from_dict(config.model.to_dict())
  model_config.validate()
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0

  # ---- Data: the embedded corpus (or your text files), a tokenizer, span-corrupted batches indexed by step.
  data = pipeline.build_pretraining_data(
      os.path.join(workdir, "cache"), inputs_length=config.data.inputs_length, batch_size=config.batch_size,
      seed=config.seed, vocab_size_spm=config.data.spm_vocab_size, tokenizer_path=config.data.tokenizer or None,
      text_glob=config.data.text_glob or None, noise_density=config.data.noise_density,
      mean_noise_span_length=config.data.mean_noise_span_length)
  if model_config.vocab_size < data.tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary of {data.tokenizer.vocab_size} ids ({data.tokenizer.model_path})")
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"config": config.to_dict(), "git": git_hash()}, f, indent=2)

  # ---- Model and optimizer.
  model = T5(model_config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  example = data.train[0]

  def init_state(rng):
    params_rng, rng = jax.random.split(rng)
    params = init_params(model_config, params_rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": rng}

  # ---- State: the latest checkpoint in the workdir if there is one, else a fresh init.
  checkpoints = ckpt_lib.Checkpoints(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
      async_save=config.async_checkpoints)
  rng = jax.random.PRNGKey(config.seed)
  start = checkpoints.latest_step()
  if start is None:
    state = jax.jit(init_state)(rng)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(init_state, rng))
    state, meta = checkpoints.restore(start, abstract)
    assert meta["data_position"] == start, meta
    print(f"Resuming from step {start} ({checkpoints.directory}).", flush=True)
  start = int(state["step"])
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  print(f"T5 with {num_params:,} params; training steps {start}..{config.total_steps}.", flush=True)

  # ---- Step functions. The state is donated: its buffers are reused for the new state.
  host_batch = jax.device_put(example)
  train_step = jax.jit(make_train_step(model, tx, schedule, config), donate_argnums=0)
  train_step = train_step.lower(state, host_batch).compile()
  eval_step = jax.jit(make_eval_step(model, config))
  tokens_per_batch = sum(example[k].size for k in ("encoder_input_tokens", "decoder_target_tokens"))

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
    last_flush = now
    writer.write(step, scalars)
    progress.report(step, scalars)

  def evaluate(step):
    nonlocal last_flush
    flush(step)
    summed = None
    for i in range(config.eval_steps):
      m = jax.device_get(eval_step(state["params"], data.eval[i]))
      summed = m if summed is None else {k: summed[k] + m[k] for k in m}
    scalars = {f"eval_{k}": v for k, v in losses.summarize(summed).items()}
    writer.write(step, scalars)
    if is_writer:
      print(f"eval at step {step}: loss {scalars['eval_loss']:.4f} | accuracy {scalars['eval_accuracy']:.4f}",
            flush=True)
    last_flush = time.monotonic()

  # ---- The loop. Batch `step` is a pure function of (seed, step), so the data position is the step itself.
  step = start
  batches = pipeline.iterate_from(data.train, start)  # prepared in background threads, ahead of the step
  try:
    while step < config.total_steps:
      state, m = train_step(state, jax.device_put(next(batches)))
      step += 1
      pending.append((step, m))
      if step % config.log_every == 0 or step == config.total_steps:
        flush(step)
      if step % config.eval_every == 0 or step == config.total_steps:
        evaluate(step)
      if step % config.checkpoint_every == 0 or step == config.total_steps or preemption.requested:
        save(step)
      if preemption.requested:
        print(f"SIGTERM received: saved a checkpoint at step {step}; exiting.", flush=True)
        break
  finally:
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
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"t5jax.train: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

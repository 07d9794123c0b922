r"""Trains T5 from a config file; a rerun with the same workdir resumes where the last one stopped.

  python -m t5jax.train --config=configs/base.py --workdir=DIR [--config.key=value ...]

`run` reads top to bottom: check the config, take the workdir's lock (workdir/run_lock.py), check the config
against the run the workdir holds (workdir/resume.py), build the run (`setup.build`: model, optimizer,
shardings, steps), check that its checkpoint fits, open the data, restore or initialize the state, compile the
step, record the run, then the loop.
The loop's stages (log, eval, decoded eval, save) are the methods of `Trainer`.
"""

import os
import signal
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

import t5jax
from t5jax import cli
from t5jax import evaluation, lora, losses, parallel, seams, setup, storage
from t5jax.workdir import checkpoint as ckpt_lib, record as workdir_lib, resume, run_lock
from t5jax import metrics as metrics_lib
from t5jax.data import loader


def check_config(config):
  """Rejects settings that would fail later, or silently do the wrong thing, with a one-line reason."""
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "grad_accum_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if config.init_from and not storage.isdir(storage.check(config.init_from, "config.init_from")):
    raise FileNotFoundError(f"config.init_from={config.init_from}: no such checkpoint directory")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by config.grad_accum_steps={config.grad_accum_steps}"
    )
  seams.check_config(config)  # the input kind's and the loss terms' own settings
  lora.check_config(config)
  if config.decode_eval_every and seams.kind(config).evaluate is None:
    raise ValueError(f"config.decode_eval_every is set, but config.data.kind={config.data.kind!r} decodes nothing")


def open_data(config, workdir, run):
  """The run's data; each process reads only its rows of every global batch."""
  cache = storage.local_cache(workdir)
  data = seams.kind(config).data(config, cache, jax.process_index(), jax.process_count(), **run.data_options)
  if run.model_config.vocab_size < data.tokenizer.vocab_size:
    raise ValueError(
      f"config.model.vocab_size={run.model_config.vocab_size} is smaller than the tokenizer's "
      f"vocabulary of {data.tokenizer.vocab_size} ids ({data.tokenizer.model_path})"
    )
  workdir_lib.check_tokenizer(workdir, data.tokenizer)
  for term in run.loss_terms:
    term.check_data(data)
  return data


def restore_or_init(run, checkpoints):
  """The latest checkpoint in the workdir if there is one, else a fresh sharded init, with weights from
  `config.init_from` if set. Returns (state, start step)."""
  config = run.config
  restored = checkpoints.restore_newest(run.abstract_state, warn=lambda m: _say(f"warning: {m}"))
  if restored is not None:
    state, meta, start = restored
    assert meta["data_position"] == start, meta
    if run.lora is not None:  # the adapters only fit the weights they were trained on
      lora.check_base(meta.get("lora_base"), run.lora, f"the checkpoint at step {start} in {checkpoints.directory}")
    _say(f"Resuming from step {start} ({checkpoints.directory}).")
    return state, start
  state = run.init_state()
  if run.lora is not None:
    _say(f"LoRA on {config.init_from}: training {_count(state['params']):,} adapter params, the base frozen.")
    if config.optimizer.name == "adafactor":  # its updates scale with the param's RMS, and B starts at zero
      _say("note: LoRA trains slowly with Adafactor (B's first updates are 1e-3 of the rate); prefer adamw")
  elif config.init_from:
    # Weights only (an imported HF checkpoint or another run); the optimizer state starts fresh for them, and
    # so do the params the checkpoint lacks by design (a new input front end, the routers of an upcycled MoE).
    params = jax.device_put(
      t5jax.load_params_for(config.init_from, run.model_config, run.abstract_state["params"], fresh=state["params"]),
      run.state_sharding["params"],
    )
    opt_state = jax.jit(run.tx.init, out_shardings=run.state_sharding["opt_state"])(params)
    state = dict(state, params=params, opt_state=opt_state)
    _say(f"Initialized the weights from {config.init_from}.")
  return state, 0


def prepare_workdir(workdir):
  """Creates `workdir` (or checks it) so that a bad one fails now, in one line, not at the first save: a
  local folder, or a gs:// URL whose bucket takes a one-object write (then deleted)."""
  storage.check(workdir)
  if storage.is_remote(workdir):
    storage.probe(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror})") from None


def run(config, workdir):
  check_config(config)  # everything is validated before anything is written: a bad run leaves no trace
  prepare_workdir(workdir)
  with run_lock.held(workdir, _say) as lock:  # one trainer per workdir, until this run ends
    return _run_holding(config, workdir, lock)


def _run_holding(config, workdir, lock):
  for note in resume.check(config, workdir):  # a changed model or data stops here, before anything is built
    _say(f"note: {note}")
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run_setup = setup.build(config, mesh)
    ckpt_lib.check_fits(os.path.join(workdir, "checkpoints"), run_setup.abstract_state)  # before the data
    _say(
      f"Preparing the data ({config.data.kind}; the first run builds its tokenizer and caches, in "
      f"{storage.local_cache(workdir)})..."
    )
    data = open_data(config, workdir, run_setup)
    checkpoints = ckpt_lib.Checkpoints(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    try:  # closed on every path: an open manager's threads print tracebacks at exit
      args = run_setup.load_step_args()  # a LoRA base, a teacher: loaded once (the base's hash before restoring)
      state, start = restore_or_init(run_setup, checkpoints)
      if start >= config.total_steps:
        _say(f"already complete at step {start} ({workdir}); nothing to train.")
        return state
      num_params = _count(run_setup.lora.shapes if run_setup.lora else state["params"])
      _say(
        f"T5 with {num_params:,} params on mesh {dict(mesh.shape)} ({config.parallel.mode}), data from "
        f"{data.source}; compiling the train step for steps {start}..{config.total_steps}..."
      )
      train_step = run_setup.with_term_args(run_setup.compile_train_step(), args)
      git = workdir_lib.git_hash()
      if jax.process_index() == 0:  # only now: a run that fails to start leaves the workdir's record as it was
        workdir_lib.record_run(workdir, config, git, data)
      trainer = Trainer(run_setup, data, checkpoints, workdir, git, start, lock, args)
      state = trainer.loop(state, train_step)
    finally:
      checkpoints.close()
      if hasattr(data, "close"):  # data that reads in processes of its own (video) ends them with the run
        data.close()
    trainer.summarize()
    return state


class Interrupted(Exception):
  """The run stopped early on a signal, after saving its state at `step`."""

  def __init__(self, signum, step):
    super().__init__(f"signal {signum} at step {step}")
    self.signum, self.step = signum, step


class Interruption:
  """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption notice) become a flag the loop reads after each
  step: it then saves and stops. A second Ctrl-C aborts at once, saving nothing more."""

  def __init__(self):
    self.signum = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = self.signum or signum

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class Trainer:
  """The training loop. Batch `step` is a pure function of (seed, step), so the data position is the step.

  Metrics stay on device until a log step (reading them each step would stall the dispatch queue); the
  time of evals and saves is left out of tokens/s.
  """

  def __init__(self, run, data, checkpoints, workdir, git, start, lock=None, args=()):
    self.run, self.config, self.data, self.checkpoints, self.git = run, run.config, data, checkpoints, git
    self.args = args  # train_step's arguments after (state, batch): a LoRA run's base merges into eval params
    self.workdir, self.start, self.started, self.lock = workdir, start, time.monotonic(), lock
    enabled = jax.process_index() == 0
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=enabled, resume_step=start)
    self.progress = metrics_lib.Progress(self.config.total_steps, start, enabled=enabled)
    self.pending = []  # (step, device metrics) not yet read back
    self.failed_reads = 0  # rows replaced since the last log (logged only by data that counts them)
    self.last_flush = time.monotonic()

  def loop(self, state, train_step):
    """Trains to `total_steps`, or until a signal: then saves and raises `Interrupted`."""
    cfg = self.config
    interruption = Interruption()
    batches = loader.iterate_from(self.data.train, self.start, num_workers=cfg.data.num_workers)
    step, stop = self.start, None
    try:
      while step < cfg.total_steps and not stop:
        batch = next(batches)
        self.failed_reads += loader.take_failed_reads(batch)
        state, m = train_step(state, parallel.host_to_global(batch, self.run.batch_sharding))
        step += 1
        self.pending.append((step, m))
        if self.lock is not None and self.lock.lost:  # taken over while this run hung: that one goes on
          raise ValueError(f"{self.lock.lost}; stopping at step {step} without saving")
        stop = interruption.signum  # read once: a signal arriving mid-save waits for the next step
        self.on_schedule(step, state, stop)
    finally:
      if hasattr(batches, "close"):
        batches.close()  # stops loader worker processes, if any
      try:
        self.checkpoints.close()  # waits for the save in flight
      finally:
        self.writer.close()
        interruption.restore()
    if stop:
      raise Interrupted(stop, step)
    return state

  def on_schedule(self, step, state, stop):
    cfg = self.config
    last = step == cfg.total_steps
    if step % cfg.log_every == 0 or last:
      self.log(step)
    evals = step % cfg.eval_every == 0 or last
    decodes = cfg.decode_eval_every and (step % cfg.decode_eval_every == 0 or last)
    params = self.run.model_params(state["params"], self.args) if evals or decodes else None
    if evals:
      self.evaluate(step, params)
    if decodes:
      self.decode_eval(step, params)
    if step % cfg.checkpoint_every == 0 or last or stop:
      self.save(step, state)

  def log(self, step):
    """Reads back pending metrics, stops on a non-finite loss, and logs the interval's averages."""
    if not self.pending:
      return
    rows, self.pending = jax.device_get(self.pending), []
    for s, m in rows:
      if not np.isfinite(m["loss_sum"]):
        good = self.checkpoints.latest_step()
        kept = (
          f"last good checkpoint: step {good} in {self.checkpoints.directory}"
          if good is not None
          else "no checkpoint was saved before it"
        )
        raise FloatingPointError(f"loss is {m['loss_sum']} at step {s}; stopping ({kept})")
    now = time.monotonic()
    scalars = losses.summarize({k: sum(m[k] for _, m in rows) for k in rows[0][1]})
    scalars.update(
      lr=float(rows[-1][1]["lr"]),
      grad_norm=float(rows[-1][1]["grad_norm"]),
      tokens_per_s=self.run.tokens_per_batch * len(rows) / max(now - self.last_flush, 1e-9),
      **{f"{kind}_skipped": n for kind, n in self.data.skipped.items()},
    )
    if loader.FAILED_READS in getattr(self.data, "step_counts", ()):
      scalars[loader.FAILED_READS], self.failed_reads = self.failed_reads, 0
    self.last_flush = now
    self.writer.write(step, scalars)
    self.progress.report(step, scalars)

  def evaluate(self, step, params):
    self.log(step)
    summed = None
    for i in range(self.config.eval_steps):
      batch = self.data.eval[i]
      loader.take_failed_reads(batch)
      batch = parallel.host_to_global(batch, self.run.batch_sharding)
      m = jax.device_get(self.run.eval_step(params, batch))
      summed = m if summed is None else {k: summed[k] + m[k] for k in m}
    scalars = {f"eval_{k}": v for k, v in losses.summarize(summed).items()}
    self.writer.write(step, scalars)
    _say(f"eval at step {step}: loss {scalars['eval_loss']:.4f} | accuracy {scalars['eval_accuracy']:.4f}")
    self.last_flush = time.monotonic()

  def decode_eval(self, step, params):
    """Metrics of decoded outputs, as the input kind scores them (tasks: exact match, accuracy, BLEU, ROUGE...)."""
    self.log(step)
    results = seams.kind(self.config).evaluate(self.run.model, params, self.data, self.config)
    scalars = evaluation.flat_scalars(results)
    self.writer.write(step, scalars)
    _say(f"decoded eval at step {step}: " + " | ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
    self.last_flush = time.monotonic()

  def summarize(self):
    """The end of a run: a loss-curve PNG in the workdir, then what happened and what to do next."""
    if jax.process_index() != 0:
      return
    rows = metrics_lib.read_metrics(os.path.join(self.workdir, "metrics.jsonl"))
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    png = os.path.join(self.workdir, "loss_curves.png")
    metrics_lib.plot_curves(
      png,
      {
        "train loss": [(r["step"], r["loss"]) for r in train],
        "eval loss": [(r["step"], r["eval_loss"]) for r in evals],
      },
      self.workdir,
    )
    wd, step = self.workdir, self.config.total_steps
    print(
      f"done: steps {self.start}..{step} in {metrics_lib.clock(time.monotonic() - self.started)} | "
      f"train loss {train[-1]['loss']:.4f} | eval loss {evals[-1]['eval_loss']:.4f} | checkpoint "
      f"{os.path.join(self.checkpoints.directory, str(step))} | loss curves {png}",
      flush=True,
    )
    decodes = seams.kind(self.config).evaluate is not None
    evaluate = f"python -m t5jax.evaluate --workdir={wd}; " if decodes else ""
    print(
      f"next: python -m t5jax.predict --checkpoint={wd} --input='...'; {evaluate}"
      f"tensorboard --logdir={os.path.join(wd, 'tensorboard')} (pip install tensorboard)",
      flush=True,
    )

  def save(self, step, state):
    self.log(step)  # never save a state whose loss went non-finite
    meta = {"data_position": step, "config": self.config.to_dict(), "git": self.git}
    if self.run.lora is not None:
      meta["lora_base"] = dict(self.run.lora.record)  # the base's path and hash: resume and predict check it
    self.checkpoints.save(step, state, meta)
    self.last_flush = time.monotonic()


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _say(message):
  if jax.process_index() == 0:
    print(message, flush=True)


def define_flags():
  """The CLI's flags, defined only when run as a program: every CLI has its own --config."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py.")
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")
  flags.DEFINE_integer(
    "distributed_heartbeat",
    30,
    "Seconds a silent (dead) process is given before the others exit with an error instead of hanging.",
  )


def main(argv, train=run):
  """The CLI; `train(config, workdir)` is `run` here, and a two-step entry point's own where it reuses this."""
  cli.check_args(argv, "workdir")
  FLAGS = flags.FLAGS
  parallel.initialize_distributed(
    FLAGS.coordinator_address,
    FLAGS.num_processes,
    FLAGS.process_id,
    timeout_s=FLAGS.distributed_timeout,
    heartbeat_s=FLAGS.distributed_heartbeat,
  )
  try:
    train(FLAGS.config, FLAGS.workdir)
  except Interrupted as e:
    if e.signum == signal.SIGTERM:  # a preemption: the scheduler restarts the same command
      _say(f"SIGTERM received: saved a checkpoint at step {e.step}; exiting.")
      return
    _say(f"interrupted: saved step {e.step}; rerun the same command to resume")
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main, "t5jax.train")

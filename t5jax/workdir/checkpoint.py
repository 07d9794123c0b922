"""Orbax checkpoints of the train state: async saves, keep the last N, restore onto given shardings.

A checkpoint is one Orbax step directory `DIR/checkpoints/<step>/` holding two items:
  state: the array pytree {params, opt_state, step, rng}, saved by every process (each writes its shards);
  meta:  JSON {data_position, config, git} that a resumed run needs beside the arrays.
Orbax writes a step into a temporary directory and renames it only once every file is complete, so a process
killed mid-save leaves no half checkpoint behind: `latest_step` never sees it, and the next run's manager
deletes the leftover temporary directory.
"""

import contextlib
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5jax import storage


class CheckpointMismatch(ValueError):
  """An intact checkpoint that does not fit the config's model or optimizer."""


class Checkpoints:
  """Saves and restores train states under `directory` (a workdir's `checkpoints/`)."""

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self._saving = None  # the step of the save in flight (async), until it is committed
    self._closed = False

  def latest_step(self):
    """The last complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step, state, meta):
    """Starts saving `state` (arrays) and `meta` (JSON-able dict) at `step`; returns at once when async.

    A step that is already saved is left as it is (a rerun never overwrites a finished checkpoint).
    """
    if step in self._manager.all_steps():
      return False
    with self._reporting_failure(self._saving or step):  # Orbax first waits for the save in flight
      self._saving = None
      started = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
      )
    self._saving = step
    return started

  def restore(self, step, abstract_state):
    """Restores (state, meta) at `step`, laying arrays out as `abstract_state`'s shardings say.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (e.g. from `jax.eval_shape` of the
    init, plus the shardings it is meant to live on), so a checkpoint restores onto any mesh.
    """
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]

  def restore_newest(self, abstract_state, warn=print):
    """(state, meta, step) from the newest checkpoint that restores, or None if there is no checkpoint.

    A damaged step (unreadable metadata, a truncated or deleted file) is reported in one line through `warn`,
    moved aside to `unreadable/<step>` beside this directory (never deleted), and the next newest is tried.
    An intact step that does not fit `abstract_state` (another model, optimizer or layout) is a
    `CheckpointMismatch`, raised before anything is moved: it is the config that is wrong, not the checkpoint.
    """
    tried = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        difference = _difference(self.directory, step, abstract_state)
      except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds; any means unreadable)
        tried.append(self._unreadable(step, e, warn))
        continue
      if difference:
        raise _mismatch(self.directory, step, difference)
      try:
        state, meta = self.restore(step, abstract_state)
        return state, meta, step
      except Exception as e:  # noqa: BLE001
        tried.append(self._unreadable(step, e, warn))
    if tried:
      raise ValueError(f"no checkpoint in {self.directory} restores; tried steps {'; '.join(tried)}")
    return None

  def _unreadable(self, step, error, warn):
    """Reports a damaged step, moves it aside, and returns how it failed (for the error if none restores)."""
    while error.__cause__ is not None:  # Orbax wraps TensorStore's error (which names the file) in its own
      error = error.__cause__
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    warn(
      f"checkpoint step {step} is unreadable ({type(error).__name__}: {reason}); moved it to "
      f"{self._move_aside(step)} and trying the next newest"
    )
    return f"{step} ({type(error).__name__}: {reason})"

  def _move_aside(self, step):
    aside = os.path.join(os.path.dirname(self.directory), "unreadable", str(step))
    if storage.exists(aside):
      aside = f"{aside}.{time.strftime('%Y%m%d-%H%M%S')}"
    storage.move(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()  # forget the step it had listed
    return aside

  def restore_meta(self, step):
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    """Blocks until any async save has been committed."""
    with self._reporting_failure(self._saving):
      self._manager.wait_until_finished()
    self._saving = None

  def close(self):
    """Waits for the save in flight and closes; closing again does nothing."""
    if self._closed:
      return
    self._closed = True
    with self._reporting_failure(self._saving):
      self._manager.close()

  @contextlib.contextmanager
  def _reporting_failure(self, step):
    """A failed save (a full disk, a lost mount, no permission) as one OSError naming the directory and the
    last complete checkpoint, which is intact: Orbax commits a step only once all of it is written."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  (TensorStore reports I/O errors as ValueError and others)
      text = str(e)
      reason = (
        "no space left on device"
        if "os_error_code='28'" in text or "No space left" in text
        else (text.strip().splitlines() or [type(e).__name__])[0][:200]
      )
      steps = complete_steps(self.directory)
      kept = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint was complete"
      raise OSError(
        f"{self.directory}: saving checkpoint step {step} failed ({reason}); {kept}. Make room (or "
        "fix the directory) and rerun the same command to resume"
      ) from e


def _shapes(tree):
  """{"params/encoder/.../kernel": (shape, dtype)} of a state pytree or of Orbax's metadata tree of one (which
  stores tuples as lists and named tuples as dicts, so keys are compared by name or index)."""

  def name(key):
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def _describe(shape_dtype):
  shape, dtype = shape_dtype
  return f"{shape} {dtype}"


def check_fits(directory, abstract_state):
  """Raises `CheckpointMismatch` if the newest checkpoint in `directory` is intact but does not fit
  `abstract_state`. Reads its metadata only and changes nothing (a damaged one is `restore_newest`'s)."""
  steps = complete_steps(directory)
  try:
    difference = steps and _difference(directory, steps[-1], abstract_state)
  except Exception:  # noqa: BLE001  (damaged: restore_newest reports it and moves it aside)
    return
  if difference:
    raise _mismatch(directory, steps[-1], difference)


def _mismatch(directory, step, difference):
  workdir = os.path.dirname(directory)
  return CheckpointMismatch(
    f"checkpoint step {step} in {directory} does not fit this config: {difference}; nothing was moved. "
    f"Rerun with the run's own settings ({os.path.join(workdir, 'config.json')}), or train in a new "
    f"--workdir (add --config.init_from={workdir} to start from its weights)"
  )


def _difference(directory, step, abstract_state):
  """The first way the arrays saved at `step` differ from `abstract_state` (a param, its shape and dtype),
  params first; None if they fit. Reads only the checkpoint's metadata."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(os.path.join(directory, str(step), "state")).item_metadata.tree
  if set(tree) == {"params"} and set(abstract_state) != {"params"}:
    return "it holds weights only (a `t5jax.convert import-hf` output?), not a training run's state"
  saved, wanted = _shapes(tree), _shapes(abstract_state)
  for key in sorted(wanted, key=lambda k: not k.startswith("params/")):
    if key not in saved:
      return f"{key} {_describe(wanted[key])} is in this config's state but not in the checkpoint"
    if saved[key] != wanted[key]:
      return f"{key} is {_describe(saved[key])} in the checkpoint and {_describe(wanted[key])} in this config"
  extra = next(k for k in saved if k not in wanted) if len(saved) > len(wanted) else None
  return f"{extra} {_describe(saved[extra])} is in the checkpoint but not in this config's state" if extra else None


def complete_steps(directory):
  """The steps of the complete checkpoints in `directory`, ascending, read from listings alone. Readers use
  this, never a `Checkpoints`: opening Orbax's manager deletes the temporary directory of a save in flight.
  On a local disk Orbax renames a step directory to its bare number once it is complete; on GCS, which cannot
  rename atomically, it writes into the bare number and marks completion with commit_success.txt, last."""
  steps = [n for n in storage.listdir(directory) if n.isdigit()]
  if storage.is_remote(directory):
    steps = [n for n in steps if storage.exists(os.path.join(directory, n, "commit_success.txt"))]
  return sorted(map(int, steps))


def load_params(directory, step=None):
  """(params, meta) from the checkpoint at `step` (default: the latest) in `directory` (a `checkpoints/`).

  Restores the `params` subtree only, as numpy arrays shaped as saved: no optimizer-state structure (nor
  memory for it) is needed, so it reads a training run's checkpoint and a converted one alike.
  """
  directory = storage.absolute(directory)
  if step is None:
    if not complete_steps(directory):
      raise FileNotFoundError(f"{directory}: no complete checkpoint")
    step = complete_steps(directory)[-1]
  if not storage.isdir(os.path.join(directory, str(step))):
    steps = complete_steps(directory)
    raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps here: {steps or 'none'})")
  try:
    return _load_params_at(directory, step)
  except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds; any means unreadable)
    others = [s for s in complete_steps(directory) if s != step]
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(
      f"{directory}: checkpoint step {step} is unreadable ({type(e).__name__}: {reason}); "
      f"pick another with --checkpoint_step (steps here: {others or 'none'})"
    ) from None


def _load_params_at(directory, step):
  state_dir = os.path.join(directory, str(step), "state")
  if not storage.isdir(state_dir):
    raise FileNotFoundError(f"{state_dir}: no such checkpoint item")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    if "params" not in tree:
      raise ValueError(f"{state_dir}: checkpoint state has no params")
    # Numpy leaves: host memory on any topology (the caller places them); partial_restore skips the rest.
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    params = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    meta = checkpointer.restore(os.path.join(directory, str(step), "meta"))
  return params["params"], meta

"""Orbax checkpoints of the train state: async saves, keep the last N, restore onto given shardings.

A checkpoint is one Orbax step directory `DIR/checkpoints/<step>/` holding two items:
  state: the array pytree {params, opt_state, step, rng}, saved by every process (each writes its shards);
  meta:  JSON {data_position, config, git} that a resumed run needs beside the arrays.
Orbax writes a step into a temporary directory and renames it only once every file is complete, so a process
killed mid-save leaves no half checkpoint behind: `latest_step` never sees it, and the next run's manager
deletes the leftover temporary directory.
"""

import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
  """Saves and restores train states under `directory` (a workdir's `checkpoints/`)."""

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

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
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step, abstract_state):
    """Restores (state, meta) at `step`, laying arrays out as `abstract_state`'s shardings say.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (e.g. from `jax.eval_shape` of the
    init, plus the shardings it is meant to live on), so a checkpoint restores onto any mesh.
    """
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_newest(self, abstract_state, warn=print):
    """(state, meta, step) from the newest checkpoint that restores, or None if there is no checkpoint.

    An unreadable step (a truncated file, a deleted item) is reported in one line through `warn`, moved
    aside to `unreadable/<step>` beside this directory (never deleted), and the next newest is tried.
    """
    tried = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
        return state, meta, step
      except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds; any means unreadable)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        tried.append(f"{step} ({type(e).__name__}: {reason})")
        warn(f"checkpoint step {step} is unreadable ({type(e).__name__}: {reason}); moved it to "
             f"{self._move_aside(step)} and trying the next newest")
    if tried:
      raise ValueError(f"no checkpoint in {self.directory} restores; tried steps {'; '.join(tried)}")
    return None

  def _move_aside(self, step):
    aside = os.path.join(os.path.dirname(self.directory), "unreadable", str(step))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    if os.path.exists(aside):
      aside = f"{aside}.{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()   # forget the step it had listed
    return aside

  def restore_meta(self, step):
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    """Blocks until any async save has been committed."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()



def load_params(directory, step=None):
  """(params, meta) from the checkpoint at `step` (default: the latest) in `directory` (a `checkpoints/`).

  Restores the `params` subtree only, as numpy arrays shaped as saved: no optimizer-state structure (nor
  memory for it) is needed, so it reads a training run's checkpoint and a converted one alike.
  """
  directory = os.path.abspath(directory)
  if step is None:
    # Orbax renames a step directory to its bare number only once it is complete.
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    if not steps:
      raise FileNotFoundError(f"{directory}: no complete checkpoint")
    step = max(steps)
  if not os.path.isdir(os.path.join(directory, str(step))):
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps here: {steps or 'none'})")
  try:
    return _load_params_at(directory, step)
  except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds; any means unreadable)
    others = sorted(int(n) for n in os.listdir(directory) if n.isdigit() and int(n) != step)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"{directory}: checkpoint step {step} is unreadable ({type(e).__name__}: {reason}); "
                     f"pick another with --checkpoint_step (steps here: {others or 'none'})") from None


def _load_params_at(directory, step):
  state_dir = os.path.join(directory, str(step), "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"{state_dir}: no such checkpoint item")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    if "params" not in tree:
      raise ValueError(f"{state_dir}: checkpoint state has no params")
    # Numpy leaves: host memory on any topology (the caller places them); partial_restore skips the rest.
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    params = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    meta = checkpointer.restore(os.path.join(directory, str(step), "meta"))
  return params["params"], meta

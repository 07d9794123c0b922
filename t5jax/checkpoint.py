"""Orbax checkpoints of the train state: async saves, keep the last N, restore onto given shardings.

A checkpoint is one Orbax step directory `DIR/checkpoints/<step>/` holding two items:
  state: the array pytree {params, opt_state, step, rng}, saved by every process (each writes its shards);
  meta:  JSON {data_position, config, git} that a resumed run needs beside the arrays.
Orbax writes a step into a temporary directory and renames it only once every file is complete, so a process
killed mid-save leaves no half checkpoint behind: `latest_step` never sees it, and the next run's manager
deletes the leftover temporary directory.
"""

import os

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

  def restore_meta(self, step):
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    """Blocks until any async save has been committed."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


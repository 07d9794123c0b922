"""The loader: iterates an indexable dataset of batches from a step, ahead of the trainer, in background
threads or worker processes.

Batches are per-host numpy arrays; putting them on devices is `parallel.py`'s job, not ours.
"""

import ctypes
import logging
import multiprocessing
import multiprocessing.util
import signal
import sys
import threading

import grain

# A batch whose reader replaced inputs it could not read (video_dataset.py) carries ((path, why), ...) of them
# under this key; it never goes to the devices: `take_failed_reads` removes it. Also the metric's name.
FAILED_READS = "videos_failed_at_read"
CLOSE_TIMEOUT_S = 30.0  # what stopping the loader's worker processes may take (grain's own waits are shorter)
_warned = set()  # the files already named in a warning by this process


def take_failed_reads(batch) -> int:
  """Removes the failed-reads record from `batch`, warns once per file, and returns how many rows it replaced."""
  failed = batch.pop(FAILED_READS, ())
  for path, why in failed:
    if path not in _warned:
      _warned.add(path)
      logging.warning("video replaced at read (and from now on): %s: %s", path, why)
  return len(failed)


def iterate_from(
  ds: grain.MapDataset, start_step: int, *, num_threads: int = 2, prefetch: int = 8, num_workers: int = 0
):
  """An iterator over `ds[start_step], ds[start_step + 1], ...`, prepared ahead of the step.

  num_workers=0: background threads of this process. num_workers>0: grain's worker processes (worker i
  computes the steps i, i + n, ...; grain hands them back in order), for preprocessing heavy enough to
  contend for the GIL. Either way the sequence is exactly ds[start_step:], so a resumed run sees the same
  batches as an uninterrupted one.
  """
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  it_ds = ds[start_step:].to_iter_dataset(read)
  if num_workers > 0:
    # Batches travel back from the workers pickled, not in shared memory: grain leaves the shared-memory
    # blocks of batches still in flight behind when the loader stops early (a leak warning on every
    # Ctrl-C or preemption), and a batch of a few MB pickles in a millisecond or two.
    it_ds = grain.experimental.WithOptionsIterDataset(it_ds, grain.experimental.DatasetOptions(min_shm_size=1 << 30))
    from absl import flags

    if not flags.FLAGS.is_parsed():
      # grain reads its own absl flags when starting workers; outside an absl app (tests, notebooks)
      # nothing has parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch // num_workers)),
      worker_init_fn=_worker_init,
    )
    return _WorkerBatches(it_ds)
  return iter(it_ds)


class _WorkerBatches:
  """The iterator of a loader with worker processes, whose `close` ends within `timeout` seconds.

  grain 0.2's close can block for ever: it empties the batch queue with a read that waits for the rest of a batch
  its prefetch process was cut off sending (seen with 2 workers, on the video loader's batches, at the end of a
  run: the run never exited). Then the processes this loader started are killed, grain's exit-time closes are
  cancelled, and the blocked read is left to a daemon thread.
  """

  def __init__(self, ds, timeout=CLOSE_TIMEOUT_S):
    self._before, self.timeout = set(multiprocessing.active_children()), timeout
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def close(self):
    closing = threading.Thread(target=self._it.close, daemon=True, name="loader-close")
    closing.start()
    closing.join(self.timeout)
    if closing.is_alive():
      started = [p for p in multiprocessing.active_children() if p not in self._before]
      logging.warning("the loader did not stop within %g s; killing its %d processes left", self.timeout, len(started))
      for process in started:
        process.kill()
      # At exit, grain's finalizers would close the iterators still open and block the same way: the process
      # would never end. Their processes are dead; the pipes go with this process.
      for finalizer in list(multiprocessing.util._finalizer_registry.values()):  # pylint: disable=protected-access
        if getattr(getattr(finalizer, "_callback", None), "__name__", "") == "_close_if_alive":
          finalizer.cancel()


def _worker_init(worker_index, worker_count):
  """Loader workers get SIGKILL when the trainer dies (Linux), so a killed run (preemption, the OOM killer)
  leaves no orphaned workers holding memory. They ignore Ctrl-C and SIGTERM, which a terminal or scheduler
  sends to the whole process group: the trainer saves, then stops them itself (no half-sent batch, no
  leaked shared memory)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG; CDLL(None): our libc

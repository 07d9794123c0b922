"""One trainer per workdir: `DIR/train.lock` names the holder (host, pid, start time) and is kept fresh by a
heartbeat, so a second trainer stops at once and a lock whose holder died never blocks the rerun.

The lock file is created whole and atomically (`storage.create_exclusive`; on gs:// too). It is
stale, and taken over with a note, when its holder's process is gone (same host: the PID is not running, or
is a zombie, or is another process that reused the number) or when its heartbeat is older than STALE_S (any
host: a lost node). A holder that finds the file no longer its own (taken over while it was hung) has lost
the lock, and the trainer stops. Readers (evaluate, predict, export) never take it.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from t5jax import storage

LOCK_FILE = "train.lock"
HEARTBEAT_S = 10  # how often the holder touches the file
STALE_S = 120  # a heartbeat this old means the holder is gone (a lost node, a hung or stopped process)


@contextlib.contextmanager
def held(workdir, say=print):
  """The lock of `workdir` for the run inside: process 0 takes it (yielded; None on the others), and every
  process learns whether it did, so that all of them stop when another trainer holds it."""
  import jax
  import numpy as np

  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error, note = None, None
  if lock is not None:
    try:
      note = lock.acquire()
    except ValueError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if not multihost_utils.broadcast_one_to_all(np.int32(error is None)) and error is None:
      error = ValueError(f"process 0 could not lock {workdir} (its error says why)")
  if error is not None:
    raise error
  if note:
    say(f"note: {note}")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


class WorkdirLock:
  """Held from `acquire` to `release` by the trainer of `workdir`; `lost` says why it was lost, if it was."""

  def __init__(self, workdir):
    self.path = storage.join(storage.absolute(workdir), LOCK_FILE)
    self.me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "proc_start": _proc_start(os.getpid()),
      "started": time.time(),
      "token": uuid.uuid4().hex,
    }
    self.lost = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    """Takes the lock or raises a one-line ValueError naming its holder. Returns a note when it took over a
    stale lock (whose holder died), else None."""
    note = None
    for _ in range(3):  # a race with another trainer taking over the same stale lock is retried
      if self._create():
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return note
      holder, age = _read(self.path)
      if holder is None:
        continue  # released or taken over meanwhile: try again
      reason = _stale_reason(holder, age)
      if reason is None:
        raise ValueError(
          f"{os.path.dirname(self.path)} is in use by another trainer ({describe(holder, age)}); "
          f"wait for it or stop it; if that process is gone, delete {self.path} and rerun"
        )
      if self._remove_stale(holder):
        note = f"took over the lock of a trainer that is gone ({describe(holder, age)}: {reason})"
    raise ValueError(f"{self.path}: could not take the lock (other trainers keep taking it); rerun")

  def release(self):
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder, _ = _read(self.path)
    if holder is not None and holder.get("token") == self.me["token"]:
      storage.remove(self.path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def _create(self):
    return storage.create_exclusive(self.path, json.dumps(self.me).encode())

  def _remove_stale(self, holder):
    """Moves the stale lock away; if what moved was a fresh lock (another trainer took over first), puts it
    back. Returns whether the stale one was removed. (On GCS, which cannot rename atomically: removed if it
    still is the stale one, a race of two takeovers in the same instant left to the heartbeat to notice.)"""
    if storage.is_remote(self.path):
      if _read(self.path)[0] == holder:
        storage.remove(self.path)
      return True
    aside = f"{self.path}.stale.{self.me['token']}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    moved, _ = _read(aside)
    if moved is not None and moved.get("token") != holder.get("token"):
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    os.unlink(aside)
    return moved is None or moved.get("token") == holder.get("token")

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      holder, age = _read(self.path)
      if holder is None and self._create():  # deleted by hand while this run holds it: take it back
        continue
      holder, age = _read(self.path) if holder is None else (holder, age)
      if holder is None or holder.get("token") != self.me["token"]:
        self.lost = f"another trainer took over the lock {self.path}" + (
          f" ({describe(holder, age)})" if holder else ""
        )
        return
      try:
        if storage.is_remote(self.path):  # an object's time is its last upload
          storage.write_bytes(self.path, json.dumps(self.me).encode())
        else:
          os.utime(self.path)
      except OSError:  # removed between the read and the touch: the next beat sees who has it
        pass


def describe(holder, age):
  if not holder:
    return f"an unreadable lock file, last written {age:.0f} s ago"
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
  return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, last heartbeat {age:.0f} s ago"


def _read(path):
  """(holder dict, heartbeat age in seconds) of the lock at `path`, or (None, None) if there is none; the
  holder is {} if the file is not a lock's JSON (locks are written whole, so no live trainer is writing it)."""
  try:
    age = time.time() - storage.mtime(path)
  except FileNotFoundError:
    return None, None
  try:
    holder = json.loads(storage.read_text(path))
    return (holder if isinstance(holder, dict) else {}), age
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError):
    return {}, age


def _stale_reason(holder, age):
  """Why the lock of `holder` (heartbeat `age` s old) is stale, or None if its holder may still be running."""
  if not holder:
    return "the lock file is not a t5jax lock's JSON"
  if holder.get("host") == socket.gethostname() and not running(holder.get("pid"), holder.get("proc_start")):
    return f"process {holder.get('pid')} is not running"
  if age > STALE_S:
    return f"no heartbeat for {age:.0f} s (more than {STALE_S} s)"
  return None


def running(pid, proc_start=None):
  """Whether process `pid` of this host runs (a zombie does not), and, given `proc_start` (clock ticks after
  boot, from /proc), is the one that started then and not another that reused the number."""
  if not isinstance(pid, int):
    return False
  if not os.path.isdir("/proc"):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    return True
  stat = _proc_stat(pid)
  return stat is not None and stat[0] != "Z" and proc_start in (None, int(stat[19]))


def _proc_stat(pid):
  """The fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None


def _proc_start(pid):
  stat = _proc_stat(pid)
  return int(stat[19]) if stat else None

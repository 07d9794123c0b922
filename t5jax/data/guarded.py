"""Calls that may hang or crash, run in a long-lived child process with a deadline each.

Decoders can hang or crash (a segfault) on a damaged file. `ChildProcess.call(fn, *args)` runs `fn(*args)` in
a child Python process and returns its result; when the call passes its deadline or the child dies, the child
is killed (and restarted on the next call) and `CallFailed` says which, so a bad file costs its caller one call,
never the process. Functions and arguments travel pickled (a top-level function or a picklable object such
as a `ClipSampler`), and so does the result. The child gets SIGKILL when the thread that started it ends, and
so when its process dies, even by SIGKILL: it never outlives its caller.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time

_HEADER = struct.Struct("<Q")  # each message: its length, then its pickle


class CallFailed(RuntimeError):
  """A call that hung, whose process died, or that raised; the message says which."""


def _read_exactly(fd: int, size: int, deadline: float) -> bytes | None:
  """`size` bytes from `fd` by `deadline` (monotonic); None on a timeout, b"" at end of file."""
  chunks, left = [], size
  while left:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
      return None
    chunk = os.read(fd, min(left, 1 << 20))
    if not chunk:
      return b""
    chunks.append(chunk)
    left -= len(chunk)
  return b"".join(chunks)


class ChildProcess:
  """One child process, asked one call at a time; killed and replaced when a call hangs or kills it.

  `timeout`: seconds a call may take. `start_timeout`: seconds a (re)started child may take to import what it
  needs before its first call, kept apart so a slow start on a busy machine is not taken for a hang.
  Pickling keeps only the settings (a loader worker starts its own child).
  """

  def __init__(self, timeout: float, start_timeout: float = 120.0):
    self.timeout, self.start_timeout, self._proc = timeout, start_timeout, None

  def __getstate__(self):
    return {"timeout": self.timeout, "start_timeout": self.start_timeout}

  def __setstate__(self, state):
    self.__init__(**state)

  @property
  def pid(self) -> int | None:
    return self._proc.pid if self._proc is not None else None

  def _start(self):
    # The child imports what this process can (its sys.path), whatever the working directory. stderr is
    # dropped: FFmpeg logs every damaged packet there; a failure comes back in the reply.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "t5jax.data.guarded"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      env=env,
    )
    if _read_exactly(self._proc.stdout.fileno(), 1, time.monotonic() + self.start_timeout) != b"+":
      self.close()
      raise CallFailed(f"the reader process did not start within {self.start_timeout:g} s")

  def call(self, fn, *args):
    """fn(*args), computed in the child; raises CallFailed if it raised, hung past the deadline or crashed."""
    if self._proc is None:
      self._start()
    request = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
    try:
      self._proc.stdin.write(_HEADER.pack(len(request)) + request)
      self._proc.stdin.flush()
    except BrokenPipeError:  # it died after its last call; this call gets a fresh one
      self.close()
      return self.call(fn, *args)
    deadline = time.monotonic() + self.timeout
    fd = self._proc.stdout.fileno()
    header = _read_exactly(fd, _HEADER.size, deadline)
    reply = _read_exactly(fd, _HEADER.unpack(header)[0], deadline) if header else header
    if reply:
      ok, value = pickle.loads(reply)
      if ok:
        return value
      raise CallFailed(value)
    if reply is None:
      error = f"the decoder hung (no answer within {self.timeout:g} s)"
    else:
      code = self._proc.wait()
      error = f"the decoder crashed ({f'signal {-code}' if code < 0 else f'exit code {code}'})"
    self.close()
    raise CallFailed(error)

  def close(self):
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      for pipe in (self._proc.stdin, self._proc.stdout):
        try:
          pipe.close()
        except BrokenPipeError:  # unflushed bytes of a call it never read
          pass
      self._proc = None

  def __del__(self):
    self.close()


class PerThread:
  """A `ChildProcess` for each thread that calls (a loader's threads read at once); pickled as its settings."""

  def __init__(self, timeout: float):
    self.timeout, self._local, self._children = timeout, threading.local(), []

  def __getstate__(self):
    return {"timeout": self.timeout}

  def __setstate__(self, state):
    self.__init__(**state)

  def call(self, fn, *args):
    child = getattr(self._local, "child", None)
    if child is None:
      child = self._local.child = ChildProcess(self.timeout)
      self._children.append(child)
    return child.call(fn, *args)

  def close(self):
    for child in self._children:
      child.close()


def _serve():
  """The child: a (function, args) message in, a (True, result) or (False, error line) message out."""
  if sys.platform.startswith("linux"):
    import ctypes, signal  # pylint: disable=import-outside-toplevel,multiple-imports

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG: die with the thread that started us
  # Replies go to a private copy of stdout; fd 1 itself goes to stderr, so nothing a C library prints can
  # break a reply.
  replies, requests = os.fdopen(os.dup(1), "wb"), sys.stdin.buffer
  os.dup2(2, 1)
  replies.write(b"+")  # started: the caller's deadlines begin now
  replies.flush()
  while header := requests.read(_HEADER.size):
    fn, args = pickle.loads(requests.read(_HEADER.unpack(header)[0]))
    try:
      reply = (True, fn(*args))
    except Exception as e:  # any failure is this call's, reported back; the process goes on
      reply = (False, (str(e).splitlines() or [type(e).__name__])[0])
    message = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    replies.write(_HEADER.pack(len(message)) + message)
    replies.flush()


if __name__ == "__main__":
  _serve()

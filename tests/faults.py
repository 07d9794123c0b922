"""Honest faults for the guarded reads (t5jax/data/guarded.py): a reader that really hangs, or really dies of
SIGSEGV, in the process that runs it. No damaged file makes decord 0.6.0 or PyAV hang or crash reliably after
passing the index's probe, so the tests mark such files by name instead."""

import dataclasses
import os
import signal
import time


def hang(*args):
  del args
  time.sleep(3600)


def segfault(*args):
  del args
  os.kill(os.getpid(), signal.SIGSEGV)


@dataclasses.dataclass(frozen=True)
class FaultySampler:
  """A ClipSampler that hangs on files named hang*, dies of SIGSEGV on files named crash*, and reads the rest."""

  sampler: object

  def __call__(self, path, rng=None):
    name = os.path.basename(path)
    if name.startswith("hang"):
      hang()
    if name.startswith("crash"):
      segfault()
    return self.sampler(path, rng)

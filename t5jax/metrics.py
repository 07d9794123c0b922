"""Where a run's numbers go: DIR/metrics.jsonl, TensorBoard event files and a progress line with an ETA."""

import io
import json
import os
import sys
import time

from t5jax import storage


def summary_writer(logdir):
  """A tensorboardX SummaryWriter for `logdir` (a local folder or a gs:// URL).

  tensorboardX imports torch, when it is installed, only to recognise torch tensors: ~2 s of CPU at the start
  of every run for scalars that are numpy here. So torch is hidden from that import (a None entry in
  sys.modules makes `import torch` raise ImportError, which tensorboardX handles) unless the process already
  has it.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter, record_writer
  finally:
    if hide:
      del sys.modules["torch"]
  record_writer.register_writer_factory("gs", _AppendingEvents)
  return SummaryWriter(logdir)


class _AppendingEvents:
  """tensorboardX's record writer for a gs:// event file: each flush uploads only the records it adds
  (`storage.append_bytes`). tensorboardX's own GCS writer uploads the whole file at every flush, so what a
  run sent grew with the square of its length. Also the factory: `open` makes one, and GCS needs no folder."""

  def __init__(self, path):
    self.path, self.pending = path, bytearray()
    storage.write_bytes(path, b"")

  @classmethod
  def open(cls, path):
    return cls(path)

  @staticmethod
  def directory_check(path):
    del path

  def write(self, data):
    self.pending += data

  def flush(self):
    if self.pending:
      storage.append_bytes(self.path, bytes(self.pending))
      self.pending.clear()

  close = flush


class MetricsWriter:
  """Writes one JSON object per logged step and the same scalars to TensorBoard.

  Only the writing process (process 0 on a multi-host run) should construct one with `enabled=True`; the
  others get a writer that drops everything, so callers never branch on the process index. Each row is
  appended (on GCS by `storage.append_bytes`, which uploads the row alone), and TensorBoard is flushed once per
  row: on the log schedule, not per scalar.
  """

  def __init__(self, workdir, *, enabled=True, resume_step=None, filename="metrics.jsonl", tensorboard="tensorboard"):
    self.enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, filename)
    if resume_step is not None:
      _truncate_after(self.path, resume_step)
    if storage.is_remote(self.path):
      self._file = None
      if not storage.exists(self.path):
        storage.write_bytes(self.path, b"")  # what the appends compose onto
    else:
      self._file = open(self.path, "a", encoding="utf-8")
    self._tb = summary_writer(os.path.join(workdir, tensorboard))

  def write(self, step, scalars):
    if not self.enabled:
      return
    line = json.dumps({"step": int(step), **scalars}, sort_keys=False) + "\n"
    try:
      if self._file is None:
        storage.append_bytes(self.path, line.encode("utf-8"))
      else:
        self._file.write(line)
        self._file.flush()
    except OSError as e:  # a full disk: name the file (a bare "[Errno 28]" names none)
      raise OSError(f"{self.path}: cannot write the metrics ({e.strerror})") from e
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      if self._file is not None:
        self._file.close()
      self._tb.close()


def _truncate_after(path, step):
  """Drops rows logged after `step`: a resumed run recomputes them, and one curve should have one value per step."""
  if storage.exists(path):
    storage.write_text(path, "".join(line for line in _lines(path) if json.loads(line)["step"] <= step))


def read_metrics(path):
  """All complete rows of a metrics.jsonl file, in order."""
  return [json.loads(line) for line in _lines(path)]


def _lines(path):
  """The complete lines of `path` ([] if there is no such file yet), each with its newline."""
  if not storage.exists(path):
    return []
  return [line for line in storage.read_text(path).splitlines(keepends=True) if _complete(line)]


def _complete(line):
  """A whole row: a run killed mid-write leaves its last line cut short (no newline)."""
  return line.endswith("\n") and bool(line.strip())


class Progress:
  """A one-line progress report per logging step: step, loss, throughput and the time left."""

  def __init__(self, total_steps, first_step, *, enabled=True, stream=sys.stdout):
    self.total, self.first, self.enabled, self.stream = total_steps, first_step, enabled, stream
    self.start = time.monotonic()

  def report(self, step, scalars):
    if not self.enabled:
      return
    elapsed = time.monotonic() - self.start
    done = max(step - self.first, 1)
    eta = elapsed / done * (self.total - step)
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {scalars[k]:.4g}" for k in ("loss", "accuracy", "lr", "grad_norm") if k in scalars]
    if "tokens_per_s" in scalars:
      parts.append(f"{scalars['tokens_per_s']:,.0f} tok/s")
    parts.append(f"ETA {clock(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)


def clock(seconds):
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_curves(path, curves, title):
  """A PNG of named curves {label: [(step, value), ...]} against the step (empty curves are left out)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for label, points in curves.items():
    if points:
      ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 20 else None)
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()  # then written whole, to a local path or a gs:// URL alike
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())

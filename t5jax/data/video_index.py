"""The video index: what a dataset's annotation file lists, and what each video holds, scanned once.

A dataset is a root directory of videos plus an annotation file of `path,caption` rows (CSV with that
header, or JSONL objects with those keys), paths relative to the root; a video may have several captions.

Each distinct video is probed once (frame count, fps, size, and its first and last frames decoded) in a
separate probe process with a timeout per file: decoders can crash or hang on a damaged file, and then it is
the probe process that dies or is killed, never the caller. A video that fails is left out with a warning and
counted. Results (failures too, so a file that hangs costs its timeout once) are cached in a JSON file keyed
by each file's size and modification time, so a rerun probes only new or changed files.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import threading

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  num_frames: int
  fps: float
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class VideoIndex:
  """`examples`: (path relative to root, caption) of readable videos, in annotation order; `info[path]`;
  `skipped[path]`: why a listed video was left out."""

  root: str
  examples: list[tuple[str, str]]
  info: dict[str, VideoInfo]
  skipped: dict[str, str]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)


def read_annotations(path: str) -> list[tuple[str, str]]:
  """(video path, caption) rows of a CSV (header `path,caption`) or JSONL annotation file."""
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    if path.endswith((".jsonl", ".json")):
      for n, line in enumerate(f, 1):
        if line.strip():
          record = json.loads(line)
          if not isinstance(record, dict) or "path" not in record or "caption" not in record:
            raise ValueError(f"{path}:{n}: expected an object with 'path' and 'caption'")
          rows.append((str(record["path"]), str(record["caption"])))
    else:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: a CSV annotation file needs the header 'path,caption', got {reader.fieldnames}")
      rows = [(r["path"], r["caption"]) for r in reader]
  if not rows:
    raise ValueError(f"{path}: no annotations")
  return rows


class _Prober:
  """A probe process, asked one file at a time; killed and replaced when it hangs or dies."""

  def __init__(self, backend: str, timeout: float):
    self.backend, self.timeout, self._proc = backend, timeout, None

  def _start(self):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
    # stderr is dropped: FFmpeg logs every damaged packet there; what failed comes back in the reply.
    self._proc = subprocess.Popen(
      _probe_command(self.backend), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )

  def probe(self, path: str) -> dict:
    if self._proc is None:
      self._start()
    try:
      self._proc.stdin.write((json.dumps(path) + "\n").encode())
      self._proc.stdin.flush()
      ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
    except BrokenPipeError:  # it died since the last file; this file gets a fresh one
      self.close()
      return self.probe(path)
    line = self._proc.stdout.readline() if ready else b""
    if line:
      return json.loads(line)
    if ready:  # end of file: the probe process died on this video
      error = f"the decoder crashed (exit code {self._proc.wait()})"
    else:
      error = f"the decoder hung (no answer within {self.timeout:g} s)"
    self.close()
    return {"error": error}

  def close(self):
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc = None


def _probe_command(backend: str) -> list[str]:
  return [sys.executable, "-m", "t5jax.data.video_index", backend]


def _stat_key(path: str) -> str:
  try:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"
  except OSError:
    return "missing"


def build_index(
  root: str, annotations: str, cache_dir: str, *, backend: str = "decord", timeout: float = 30.0, num_workers: int = 1
) -> VideoIndex:
  """Probes every video the annotation file lists (cached in cache_dir); raises if none is readable.

  `num_workers` probe processes run at once; the cache is saved every 1,000 probes, so an interrupted scan of a
  large dataset resumes where it stopped.
  """
  rows = read_annotations(annotations)
  paths = list(dict.fromkeys(p for p, _ in rows))
  os.makedirs(cache_dir, exist_ok=True)
  digest = hashlib.md5(f"{os.path.abspath(root)}|{backend}".encode()).hexdigest()[:12]
  cache_path = os.path.join(cache_dir, f"video_index_{digest}.json")
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  stats = {rel: _stat_key(os.path.join(root, rel)) for rel in paths}
  todo = [rel for rel in paths if cache.get(rel, {}).get("stat") != stats[rel]]
  for n, (rel, reply) in enumerate(_probe_all(root, todo, backend, timeout, num_workers), 1):
    cache[rel] = dict(reply, stat=stats[rel])
    if n % 1000 == 0:
      _save(cache_path, cache)
  _save(cache_path, cache)
  return _index_from(root, annotations, rows, {rel: cache[rel] for rel in paths})


def _probe_all(root, paths, backend, timeout, num_workers):
  """Yields (path, reply) in order, from `num_workers` probe processes (one per thread; threads only wait)."""
  local, probers = threading.local(), []

  def probe(rel):
    if not hasattr(local, "prober"):
      local.prober = _Prober(backend, timeout)
      probers.append(local.prober)
    return rel, local.prober.probe(os.path.join(root, rel))

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      yield from pool.map(probe, paths)
  finally:
    for prober in probers:
      prober.close()


def _save(path, cache):
  with open(path + ".tmp", "w") as f:
    json.dump(cache, f)
  os.replace(path + ".tmp", path)  # never a half-written cache


def _index_from(root, annotations, rows, results) -> VideoIndex:
  skipped = {p: r["error"] for p, r in results.items() if "error" in r}
  if len(skipped) == len(results):
    first = next(iter(skipped))
    raise ValueError(
      f"no readable video: all {len(results)} listed in {annotations} (root {root}) failed, e.g. "
      f"{first}: {skipped[first]}"
    )
  for p, error in list(skipped.items())[:10]:
    logging.warning("video left out: %s: %s", os.path.join(root, p), error)
  if skipped:
    logging.warning("%d of %d videos left out (unreadable)", len(skipped), len(results))
  info = {
    p: VideoInfo(r["num_frames"], r["fps"], r["height"], r["width"]) for p, r in results.items() if "error" not in r
  }
  return VideoIndex(root=root, examples=[(p, c) for p, c in rows if p in info], info=info, skipped=skipped)


def _serve(backend: str):
  """The probe process: a JSON path per line in, a JSON object per line out."""
  from t5jax.data.video import VideoReader  # pylint: disable=import-outside-toplevel

  if sys.platform.startswith("linux"):
    import ctypes, signal  # pylint: disable=import-outside-toplevel,multiple-imports

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG: die with the indexing process
  # Replies go to a private copy of stdout; fd 1 itself goes to stderr, so nothing a C library prints can
  # break a reply.
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  for line in sys.stdin:
    path = json.loads(line)
    try:
      with VideoReader(path, mode="seek", backend=backend, num_threads=1) as reader:
        reader.read_frames([0, reader.num_frames - 1])  # a damaged file usually fails at one end
        reply = {"num_frames": reader.num_frames, "fps": reader.fps, "height": reader.size[0], "width": reader.size[1]}
    except Exception as e:  # any failure is this file's, reported back; the process goes on
      message = (str(e).splitlines() or [type(e).__name__])[0]
      reply = {"error": message.removeprefix(f"{path}: ")}  # the caller names the file itself
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  _serve(sys.argv[1])

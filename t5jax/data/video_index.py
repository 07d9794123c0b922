"""The video index: what a dataset's annotation file lists, and what each video holds, scanned once.

A dataset is a root directory of videos plus an annotation file of `path,caption` rows (CSV with that
header, or JSONL objects with those keys), paths relative to the root; a video may have several captions.

Each distinct video is probed once (frame count, fps, size, and its first and last frames decoded) in a
separate probe process with a timeout per file (`guarded.ChildProcess`): decoders can crash or hang on a
damaged file, and then it is the probe process that dies or is killed, never the caller. A video that fails is
left out with a warning and counted. Results (failures too, so a file that hangs costs its timeout once) are cached in a JSON file keyed
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

from t5jax.data import guarded


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
  probers = guarded.PerThread(timeout)

  def probe(rel):
    try:
      return rel, probers.call(probe_file, os.path.join(root, rel), backend)
    except guarded.CallFailed as e:
      return rel, {"error": str(e)}

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      yield from pool.map(probe, paths)
  finally:
    probers.close()


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


def probe_file(path: str, backend: str) -> dict:
  """What the index keeps of one video (its first and last frames decoded), or {"error": why}; run in a
  `guarded.ChildProcess`."""
  from t5jax.data.video import VideoReader  # pylint: disable=import-outside-toplevel

  try:
    with VideoReader(path, mode="seek", backend=backend, num_threads=1) as reader:
      reader.read_frames([0, reader.num_frames - 1])  # a damaged file usually fails at one end
      return {"num_frames": reader.num_frames, "fps": reader.fps, "height": reader.size[0], "width": reader.size[1]}
  except Exception as e:  # any failure is this file's, reported back; the process goes on
    message = (str(e).splitlines() or [type(e).__name__])[0]
    return {"error": message.removeprefix(f"{path}: ")}  # the caller names the file itself

r"""Video reader frames/s: t5jax's VideoReader (decord and PyAV backends, seek and stream modes) against bare
decord `get_batch`, on the same files and clips.

  python benchmarks/video_readers.py [--videos=4 --clips=8 --rounds=3 --size=320x240 --frames=300 --gop=60]

Makes `--videos` H.264 mp4 files (a moving gradient with texture, 30 fps, a keyframe every `--gop` frames,
as web video has) in a temporary directory. Three kinds of 16-frame clip, drawn once and shared by every
reader: a sequential clip, a strided one (every 4th frame), and 16 random frames of the whole video. Each
clip opens its reader afresh, as a loader worker does for each example, and the time includes the open.
Rounds alternate the readers so the noise of a shared machine falls on all of them; the median round is
reported, with each reader's ratio to bare decord. The loader-pipeline and worker-scaling figures of issue 12 need the grain video dataset.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5jax.data.video import VideoReader  # noqa: E402
from t5jax.data.video_synthetic import encode_video  # noqa: E402

CLIP = 16


def make_video(path, frames, height, width, gop, seed):
  rng = np.random.default_rng(seed)
  texture = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
  y, x = np.mgrid[0:height, 0:width]
  video = np.empty((frames, height, width, 3), np.uint8)
  for t in range(frames):
    video[t, ..., 0] = (x + 3 * t) % 256
    video[t, ..., 1] = (y + 2 * t) % 256
    video[t, ..., 2] = (x + y + t) % 256
    video[t] = np.roll(texture, 2 * t, axis=1) + video[t] // 2
  return encode_video(path, video, 30, options={"g": str(gop), "crf": "23"})


def clips(kind, num_frames, n, rng):
  """n index arrays of one kind of clip."""
  out = []
  for _ in range(n):
    if kind == "sequential":
      start = rng.integers(0, num_frames - CLIP + 1)
      out.append(np.arange(start, start + CLIP))
    elif kind == "strided":
      start = rng.integers(0, num_frames - 4 * (CLIP - 1))
      out.append(np.arange(start, start + 4 * CLIP, 4))
    else:
      out.append(np.sort(rng.choice(num_frames, CLIP, replace=False)))
  return out


def bare_decord(path, indices):
  import decord  # pylint: disable=import-outside-toplevel
  return decord.VideoReader(path, num_threads=1).get_batch(list(indices)).asnumpy()


def ours(backend, mode):
  def read(path, indices):
    with VideoReader(path, mode=mode, backend=backend, num_threads=1) as reader:
      return reader.read_frames(indices)
  return read


def main():
  tmp = tempfile.mkdtemp(prefix="t5jax_video_bench_")
  width, height = map(int, args.size.split("x"))
  paths = [make_video(os.path.join(tmp, f"{i}.mp4"), args.frames, height, width, args.gop, i)
           for i in range(args.videos)]
  readers = {"bare decord get_batch": bare_decord}
  for backend in ("decord", "pyav"):
    for mode in ("stream", "seek"):
      readers[f"{backend} {mode}"] = ours(backend, mode)
  rng = np.random.default_rng(0)
  work = {kind: [(p, c) for p in paths for c in clips(kind, args.frames, args.clips, rng)]
          for kind in ("sequential", "strided", "random")}
  rates = {(r, k): [] for r in readers for k in work}
  for _ in range(args.rounds):
    for kind, jobs in work.items():
      for name, read in readers.items():
        start = time.perf_counter()
        for path, indices in jobs:
          read(path, indices)
        rates[name, kind].append(len(jobs) * CLIP / (time.perf_counter() - start))
  print(f"{args.videos} videos of {args.frames} frames, {width}x{height}, keyframe every {args.gop}; "
        f"{args.clips} clips of {CLIP} frames per video and kind; medians of {args.rounds} rounds")
  bare = "bare decord get_batch"
  print("| reader | " + " | ".join(f"{k} frames/s (x bare decord)" for k in work) + " |")
  print("|---|" + "---|" * len(work))
  for name in readers:
    # Each ratio is taken within a round (readers run back to back there), then the median over rounds.
    cells = [f"{statistics.median(rates[name, k]):.0f} "
             f"({statistics.median(r / b for r, b in zip(rates[name, k], rates[bare, k])):.2f})" for k in work]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--videos", type=int, default=4)
  parser.add_argument("--clips", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--size", default="320x240")
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument("--gop", type=int, default=60)
  args = parser.parse_args()
  main()

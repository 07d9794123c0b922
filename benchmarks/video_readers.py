r"""Video frames/s: t5jax's readers and its whole video input pipeline, each against bare decord `get_batch`
on the same files and clips.

  python benchmarks/video_readers.py --part=readers [--videos=4 --clips=8 --rounds=3 --size=320x240 --frames=300]
  python benchmarks/video_readers.py --part=pipeline [--rounds=3 --batches=16 --workers=1,2,4 --decode_size=224x224]

Makes `--videos` H.264 mp4 files (a moving gradient with texture, 30 fps, a keyframe every `--gop` frames,
as web video has) in a temporary directory. Three kinds of 16-frame clip, drawn once and shared by every
reader: a sequential clip, a strided one (every 4th frame), and 16 random frames of the whole video. Each
clip opens its reader afresh, as a loader worker does for each example, and the time includes the open.
Rounds alternate the readers so the noise of a shared machine falls on all of them; the median round is
reported, with each reader's ratio to bare decord.

Pipeline: the training batches of `video_dataset.VideoStep` (per-example clip sampling from the (seed,
position) rng, decode resized to --decode_size, stacking, caption tokens) through t5jax's grain loader with
1, 2 and 4 worker processes (one read thread each), timed over --batches batches after a warm-up of
max(--workers) batches (the workers start), with every contender on the same batches; bare decord reads the very same clips of the same batches (`VideoStep.examples` and
`clip_indices` give them) with `VideoReader(path, width, height).get_batch`, one process. With one worker
both use one core for decoding, so their ratio is the pipeline's overhead; more workers show its scaling.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5jax.data import loader, video_dataset  # noqa: E402
from t5jax.data.video import ClipSampler, ClipSpec, VideoReader, clip_indices  # noqa: E402
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


def make_videos(tmp):
  width, height = map(int, args.size.split("x"))
  return [
    make_video(os.path.join(tmp, f"{i}.mp4"), args.frames, height, width, args.gop, i) for i in range(args.videos)
  ]


def readers_table(paths):
  readers = {"bare decord get_batch": bare_decord}
  for backend in ("decord", "pyav"):
    for mode in ("stream", "seek"):
      readers[f"{backend} {mode}"] = ours(backend, mode)
  rng = np.random.default_rng(0)
  work = {
    kind: [(p, c) for p in paths for c in clips(kind, args.frames, args.clips, rng)]
    for kind in ("sequential", "strided", "random")
  }
  rates = {(r, k): [] for r in readers for k in work}
  for _ in range(args.rounds):
    for kind, jobs in work.items():
      for name, read in readers.items():
        start = time.perf_counter()
        for path, indices in jobs:
          read(path, indices)
        rates[name, kind].append(len(jobs) * CLIP / (time.perf_counter() - start))
  print(
    f"{args.videos} videos of {args.frames} frames, {args.size}, keyframe every {args.gop}; "
    f"{args.clips} clips of {CLIP} frames per video and kind; medians of {args.rounds} rounds"
  )
  bare = "bare decord get_batch"
  print("| reader | " + " | ".join(f"{k} frames/s (x bare decord)" for k in work) + " |")
  print("|---|" + "---|" * len(work))
  for name in readers:
    # Each ratio is taken within a round (readers run back to back there), then the median over rounds.
    cells = [
      f"{statistics.median(rates[name, k]):.0f} "
      f"({statistics.median(r / b for r, b in zip(rates[name, k], rates[bare, k], strict=True)):.2f})"
      for k in work
    ]
    print(f"| {name} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------------------
# The pipeline against bare decord.


def pipeline_step(paths, decode_hw):
  """The training batches of a run over `paths`: 16-frame clips 2 apart, decoded at `decode_hw`."""
  sampler = ClipSampler(clip=ClipSpec(CLIP, stride=2.0), width=decode_hw[1], height=decode_hw[0])
  targets = np.ones((len(paths), 16), np.int32)
  return video_dataset.VideoStep(
    "", paths, targets, sampler, prefix=None, batch_size=args.batch_size, shard_index=0, shard_count=1, shuffle_seed=0
  )


def time_bare(step_fn, steps, decode_hw):
  """Seconds for bare decord to read the clips of `steps`' batches (the pipeline's own draws)."""
  import decord  # pylint: disable=import-outside-toplevel

  lengths = {p: len(decord.VideoReader(p)) for p in step_fn.paths}
  start = time.perf_counter()
  for s in steps:
    for i, rng in step_fn.examples(s):
      path = step_fn.paths[i]
      indices, _ = clip_indices(lengths[path], 30.0, step_fn.sampler.clip, rng)
      vr = decord.VideoReader(path, width=decode_hw[1], height=decode_hw[0], num_threads=1)
      vr.get_batch(list(indices)).asnumpy()
  return time.perf_counter() - start


def time_pipeline(step_fn, steps, workers, decode_hw, warm):
  """Seconds for t5jax's loader with `workers` processes to deliver the batches `steps` (a range), after
  `warm` >= workers batches before it (the workers start, and each makes its first batch)."""
  import grain  # pylint: disable=import-outside-toplevel

  # One read thread per worker: n workers decode n clips at a time, as n bare decord processes would.
  batches = loader.iterate_from(
    grain.MapDataset.range(2**62).map(step_fn),
    steps.start - warm,
    num_threads=1,
    num_workers=workers,
    prefetch=2 * workers,
  )
  for _ in range(warm):
    next(batches)
  start = time.perf_counter()
  for _ in steps:
    batch = next(batches)
  elapsed = time.perf_counter() - start
  assert batch["frames"].shape == (args.batch_size, CLIP, *decode_hw, 3)
  batches.close()
  return elapsed


def pipeline_table(paths):
  decode_hw = tuple(int(x) for x in reversed(args.decode_size.split("x")))
  step_fn = pipeline_step(paths, decode_hw)
  workers = [int(w) for w in args.workers.split(",")]
  contenders = {"bare decord get_batch, 1 process": lambda steps: time_bare(step_fn, steps, decode_hw)}
  for w in workers:
    contenders[f"pipeline, {w} loader worker{'s' if w > 1 else ''}"] = lambda steps, w=w: time_pipeline(
      step_fn, steps, w, decode_hw, max(workers)
    )
  frames = args.batches * args.batch_size * CLIP
  rates = {name: [] for name in contenders}
  for r in range(args.rounds):  # each round: new batches, read by every contender, in alternating order
    steps = range(1000 * r + max(workers), 1000 * r + max(workers) + args.batches)
    for name in list(contenders) if r % 2 == 0 else list(contenders)[::-1]:
      rates[name].append(frames / contenders[name](steps))
  print(
    f"{len(paths)} videos of {args.frames} frames {args.size}, decoded at {args.decode_size}; batches of "
    f"{args.batch_size} clips of {CLIP} frames 2 apart; {args.batches} batches a round, {args.rounds} rounds"
  )
  print("| reader | frames/s per round | median | x bare decord per round (min / median) |")
  print("|---|---|---|---|")
  bare = rates[next(iter(contenders))]
  for name, rate in rates.items():
    ratios = [o / b for o, b in zip(rate, bare, strict=True)]
    print(
      f"| {name} | {' '.join(f'{x:.0f}' for x in rate)} | {statistics.median(rate):.0f} | "
      f"{' '.join(f'{x:.2f}' for x in ratios)} ({min(ratios):.2f} / {statistics.median(ratios):.2f}) |"
    )


def main():
  paths = make_videos(tempfile.mkdtemp(prefix="t5jax_video_bench_"))
  if args.part in ("readers", "all"):
    readers_table(paths)
  if args.part in ("pipeline", "all"):
    pipeline_table(paths)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", choices=("readers", "pipeline", "all"), default="all")
  parser.add_argument("--batches", type=int, default=16, help="pipeline: timed batches per round and contender")
  parser.add_argument("--batch_size", type=int, default=8, help="pipeline: clips per batch")
  parser.add_argument("--workers", default="1,2,4", help="pipeline: loader worker counts to time")
  parser.add_argument("--decode_size", default="224x224", help="pipeline: WxH frames are resized to at decode")
  parser.add_argument("--videos", type=int, default=4)
  parser.add_argument("--clips", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--size", default="320x240")
  parser.add_argument("--frames", type=int, default=300)
  parser.add_argument("--gop", type=int, default=60)
  args = parser.parse_args()
  main()

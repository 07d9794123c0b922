r"""Video frames/s on natural-looking H.264 (720p and 1080p, B-frames, keyframes every 60 or 250 frames):
t5jax's readers (decord and PyAV, stream and seek), and its whole video input pipeline against bare decord.

  python benchmarks/video_readers.py --part=readers [--sets=1280x720/60,1280x720/250,1920x1080/60,1920x1080/250
      --frames=270 --clips=1 --rounds=3 --video_dir=DIR]
  python benchmarks/video_readers.py --part=pipeline [--rounds=3 --batches=4 --batch_size=4 --workers=1,2]
  python benchmarks/video_readers.py --part=seeks [--seek_reads=12]    # which frame a seek gives, no timing
  python benchmarks/video_readers.py --part=versions --pythons=ENV_A/bin/python,ENV_B/bin/python

Each set WxH/G is one mp4 of --frames frames at 30 fps, a keyframe every G frames (x264's default is 250;
streaming encodes use about 2 s) and 3 B-frames between references (x264 veryfast, crf 23). The content is
a smooth noise texture, panned and slowly zoomed, with discs crossing it: motion everywhere, so the decoder
does real work. --video_dir keeps the files, so runs in two environments (decord 0.6 and decord2) read the
very same bytes; made once, they cost nothing the next time.

Readers: three kinds of 16-frame clip, drawn once and shared by every reader: a sequential clip, a strided
one (every 4th frame), and 16 random frames of the whole video. Each clip opens its reader afresh, as a
loader worker does for each example, with one decoder thread, and the time includes the open. Rounds
alternate the readers' order so the noise of a shared machine falls on all of them; the median round is
reported, with each reader's ratio to PyAV stream, a peer that is the same in every environment.

Seeks: frames read one at a time in a random order (backwards too, across GOPs), by each reader, against
PyAV decoding the file front to back (the checks of decord's reports of wrong frames after seeks).

Versions: bare decord `get_batch` on the readers' clips in two environments (decord 0.6 and decord2), a
process each, taking turns clip by clip on the same files: the two decoders against each other in one run.

Pipeline: the training batches of `video_dataset.VideoStep` (per-example clip sampling from the (seed,
position) rng, decode resized to --decode_size, stacking, caption tokens) over the --pipeline_size files,
through t5jax's grain loader with each of --workers worker processes (one read thread each), timed over
--batches batches after a warm-up of max(--workers) batches (the workers start), every contender on the
same batches; bare decord reads the very same clips (`VideoStep.examples` and `clip_indices` give them) with
`decord.VideoReader(path, width, height).get_batch`, one process. With one worker both decode on one core,
so their ratio is the pipeline's overhead.
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
READERS = [(backend, mode) for backend in ("decord", "pyav") for mode in ("stream", "seek")]
PEER = ("pyav", "stream")
KINDS = ("sequential", "strided", "random")


class NaturalVideo:
  """uint8 frames [T, H, W, 3] made one at a time (a 1080p video would not fit in memory whole): a smooth
  noise texture panned by (2, 3) pixels a frame and zoomed by up to 8%, under four shaded discs that cross it."""

  def __init__(self, frames, height, width, seed):
    from scipy import ndimage  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    ch, cw = height + 2 * frames + 128, width + 3 * frames + 128
    coarse = ndimage.gaussian_filter(rng.normal(size=(ch // 8 + 1, cw // 8 + 1, 3)), (2, 2, 0))
    canvas = ndimage.zoom(coarse, (8, 8, 1), order=1)[:ch, :cw]
    canvas += 0.15 * ndimage.gaussian_filter(rng.normal(size=(ch, cw)), 1.5)[..., None]  # fine detail
    self.canvas = np.clip(128 + 50 * (canvas - canvas.mean()) / canvas.std(), 0, 255).astype(np.uint8)
    self.shape = (frames, height, width, 3)
    self.discs = [
      (rng.uniform(0.1, 0.9, 2) * (height, width), rng.uniform(-6, 6, 2), height // rng.integers(6, 12), colour)
      for colour in rng.integers(40, 230, (4, 3))
    ]

  def __getitem__(self, t):
    _, height, width, _ = self.shape
    zoom = 1.0 + 0.08 * np.sin(t / 30)
    rows = (64 + 2 * t + height / 2 + (np.arange(height) - height / 2) / zoom).astype(np.intp)
    cols = (64 + 3 * t + width / 2 + (np.arange(width) - width / 2) / zoom).astype(np.intp)
    frame = self.canvas.take(rows, 0).take(cols, 1)
    for start, velocity, radius, colour in self.discs:
      cy, cx = (start + t * velocity) % (height, width)  # wraps around the frame's edges
      y0, x0 = int(max(cy - radius, 0)), int(max(cx - radius, 0))
      y, x = np.ogrid[y0 : int(min(cy + radius, height)), x0 : int(min(cx + radius, width))]
      inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
      shade = 0.6 + 0.4 * (y - cy + radius) / (2 * radius)  # lit from below: a gradient, not a flat colour
      box = frame[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]]
      box[inside] = (colour * np.broadcast_to(shade, inside.shape)[inside][:, None]).astype(np.uint8)
    return frame


def make_video(video_dir, size, gop, frames, seed):
  """The mp4 of one set, made unless --video_dir has it already."""
  width, height = size
  path = os.path.join(video_dir, f"natural_{width}x{height}_gop{gop}_{frames}f.mp4")
  if not os.path.exists(path):
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3"
    options = {"preset": "veryfast", "crf": "23", "x264-params": params}
    encode_video(path + ".tmp.mp4", NaturalVideo(frames, height, width, seed), 30, options=options)
    os.replace(path + ".tmp.mp4", path)
  return path


def describe(path):
  """Size, bitrate, keyframes and B-frames of a file, from its packets (no decoding)."""
  import av  # pylint: disable=import-outside-toplevel

  with av.open(path) as container:
    packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
  # In decode order a B-frame is shown before a frame decoded ahead of it: its pts is below the largest so far.
  stamps = np.array([pts for pts, _ in packets])
  b_frames = int((stamps[1:] < np.maximum.accumulate(stamps)[:-1]).sum())
  mbit = os.path.getsize(path) * 8 / 1e6 / (len(packets) / 30)
  keys = [i for i, (_, key) in enumerate(sorted(packets)) if key]
  return f"{os.path.basename(path)}: {mbit:.1f} Mbit/s, keyframes at {keys}, {b_frames} of {len(packets)} B-frames"


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


def time_reader(backend, mode, path, jobs):
  start = time.perf_counter()
  for indices in jobs:
    with VideoReader(path, mode=mode, backend=backend, num_threads=1) as reader:
      reader.read_frames(indices)
  return len(jobs) * CLIP / (time.perf_counter() - start)


def readers_table(path):
  rng = np.random.default_rng(0)
  work = {kind: clips(kind, args.frames, args.clips, rng) for kind in KINDS}
  rates = {(r, k): [] for r in READERS for k in work}
  for round_ in range(args.rounds):
    for kind, jobs in work.items():
      for reader in READERS if round_ % 2 == 0 else READERS[::-1]:
        rates[reader, kind].append(time_reader(*reader, path, jobs))
  print(f"\n{describe(path)}; {args.clips} clip(s) of {CLIP} frames per kind; medians of {args.rounds} rounds")
  print("| reader | " + " | ".join(f"{k} frames/s (x pyav stream)" for k in work) + " |")
  print("|---|" + "---|" * len(work))
  for reader in READERS:
    # Each ratio is taken within a round (readers run back to back there), then the median over rounds.
    cells = [
      f"{statistics.median(rates[reader, k]):.1f} "
      f"({statistics.median(r / p for r, p in zip(rates[reader, k], rates[PEER, k], strict=True)):.2f})"
      for k in work
    ]
    print(f"| {' '.join(reader)} | " + " | ".join(cells) + " |")


def seeks_table(path):
  """--seek_reads frames read one at a time in a random order (each a seek, backwards too, across GOPs) by each
  reader, matched against PyAV decoding the whole file front to back: which frame each read gave (the nearest
  in a grid of every 8th pixel), and how far it is from the frame asked for."""
  import av  # pylint: disable=import-outside-toplevel

  with av.open(path) as container:
    grid = np.stack([f.to_ndarray(format="rgb24")[::8, ::8] for f in container.decode(video=0)]).astype(np.int16)
  order = np.random.default_rng(1).permutation(len(grid))[: args.seek_reads]
  cells = []
  for backend, mode in READERS:
    with VideoReader(path, mode=mode, backend=backend, num_threads=1) as reader:
      got = [reader.read_frames([i])[0][::8, ::8].astype(np.int16) for i in order]
    diffs = [np.abs(grid - g).mean(axis=(1, 2, 3)) for g in got]  # to every frame of the sequential decode
    wrong = [(int(i), int(d.argmin())) for i, d in zip(order, diffs, strict=True) if d.argmin() != i]
    worst = max(d[i] for i, d in zip(order, diffs, strict=True))
    cells.append(
      f"{len(order) - len(wrong)}/{len(order)}, {worst:.2f}" + (f" (asked, got: {wrong[:3]})" if wrong else "")
    )
  print(f"| {os.path.basename(path)} | " + " | ".join(cells) + " |")


def serve_bare():
  """One environment's side of --part=versions: reads `path index index ...` lines from stdin, answers each
  with the seconds bare decord takes to open the file and `get_batch` those frames (one decoder thread)."""
  import decord  # pylint: disable=import-outside-toplevel

  print(decord.__version__, flush=True)
  for line in sys.stdin:
    path, *indices = line.split()
    start = time.perf_counter()
    decord.VideoReader(path, num_threads=1).get_batch([int(i) for i in indices]).asnumpy()
    print(time.perf_counter() - start, flush=True)


def versions_table(paths):
  """Bare decord in each of --pythons' environments (decord 0.6 and decord2, say), a server process each,
  taking turns clip by clip (the order alternating) on readers_table's clips: frames/s, and the ratio of the
  last to the first within each round."""
  import subprocess  # pylint: disable=import-outside-toplevel

  servers = [
    subprocess.Popen([python, __file__, "--part=bare"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for python in args.pythons.split(",")
  ]
  names = [f"decord {server.stdout.readline().strip()}" for server in servers]
  work = {}
  for path in paths:
    rng = np.random.default_rng(0)  # readers_table's draws, in its order
    for kind in KINDS:
      work[f"{os.path.basename(path)} {kind}"] = [(path, c) for c in clips(kind, args.frames, args.clips, rng)]
  seconds = {(n, key): [0.0] * args.rounds for n in names for key in work}
  pairs, turn = list(zip(names, servers, strict=True)), 0
  for round_ in range(args.rounds):
    for key, jobs in work.items():
      for path, indices in jobs:
        turn += 1
        for name, server in pairs if turn % 2 else pairs[::-1]:
          server.stdin.write(f"{path} {' '.join(map(str, indices))}\n")
          server.stdin.flush()
          seconds[name, key][round_] += float(server.stdout.readline())
  for server in servers:
    server.stdin.close()
    server.wait()
  print(f"\nbare decord get_batch, {args.clips} clip(s) of {CLIP} frames per kind and file, {args.rounds} rounds")
  print(f"| file, clip | {' | '.join(f'{n} frames/s' for n in names)} | {names[-1]} / {names[0]} per round (median) |")
  print("|---|" + "---|" * (len(names) + 1))
  for key, jobs in work.items():
    ratios = [a / b for a, b in zip(seconds[names[0], key], seconds[names[-1], key], strict=True)]
    cells = " | ".join(f"{len(jobs) * CLIP / statistics.median(seconds[n, key]):.1f}" for n in names)
    print(f"| {key} | {cells} | {' '.join(f'{x:.2f}' for x in ratios)} ({statistics.median(ratios):.2f}) |")


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
    f"\n{len(paths)} videos of {args.frames} frames {args.pipeline_size}, decoded at {args.decode_size}; batches "
    f"of {args.batch_size} clips of {CLIP} frames 2 apart; {args.batches} batches a round, {args.rounds} rounds"
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
  import decord  # pylint: disable=import-outside-toplevel

  if args.part == "bare":
    serve_bare()
    return
  video_dir = args.video_dir or tempfile.mkdtemp(prefix="t5jax_video_bench_")
  os.makedirs(video_dir, exist_ok=True)
  sets = [(tuple(map(int, s.split("/")[0].split("x"))), int(s.split("/")[1])) for s in args.sets.split(",")]
  paths = {s: make_video(video_dir, *s, args.frames, i) for i, s in enumerate(sets)}
  print(f"decord {decord.__version__}; {args.video_dir or video_dir}")
  if args.part == "versions":
    versions_table(paths.values())
  if args.part in ("readers", "all"):
    for path in paths.values():
      readers_table(path)
  if args.part == "seeks":
    print("| file | " + " | ".join(f"{' '.join(r)}: right frames, worst mean diff" for r in READERS) + " |")
    print("|---|" + "---|" * len(READERS))
    for path in paths.values():
      seeks_table(path)
  if args.part in ("pipeline", "all"):
    pipeline_size = tuple(map(int, args.pipeline_size.split("x")))
    pipeline_table([p for (size, _), p in paths.items() if size == pipeline_size])


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", choices=("readers", "pipeline", "all", "seeks", "versions", "bare"), default="all")
  parser.add_argument("--sets", default="1280x720/60,1280x720/250,1920x1080/60,1920x1080/250", help="WxH/GOP,...")
  parser.add_argument("--frames", type=int, default=270, help="frames a video (30 fps)")
  parser.add_argument("--video_dir", default="", help="where the videos are kept (default: a new temporary one)")
  parser.add_argument("--clips", type=int, default=1, help="readers: clips per kind and video")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seek_reads", type=int, default=12, help="seeks: frames read one at a time per file")
  parser.add_argument("--pythons", default="", help="versions: interpreters of the environments to compare, a,b")
  parser.add_argument("--pipeline_size", default="1280x720", help="pipeline: the sets (WxH) it reads")
  parser.add_argument("--batches", type=int, default=4, help="pipeline: timed batches per round and contender")
  parser.add_argument("--batch_size", type=int, default=4, help="pipeline: clips per batch")
  parser.add_argument("--workers", default="1,2", help="pipeline: loader worker counts to time")
  parser.add_argument("--decode_size", default="224x224", help="pipeline: WxH frames are resized to at decode")
  args = parser.parse_args()
  main()

r"""Memory over a long video read, and what the guarded read costs per clip.

  python benchmarks/video_soak.py --backend decord [--reads 20000 --workers 2 --out soak.jsonl]
  python benchmarks/video_soak.py --cost [--backend decord --clips 300]

Soak: a folder of mixed videos (H.264 and MPEG-4 Part 2, 32 to 96 pixels, 16 to 96 frames, groups of 4 to
250 frames, one with a damaged middle that fails at read and one cut short that the index leaves out) read
through configs/video.py's real loader (`loader.iterate_from`, `--workers` grain processes, each read guarded
in a reader process), and the resident memory (RSS) of every process -- this one, each loader worker, each
reader process -- sampled every 1,000 clip reads. Target: the total grows by at most 50 MB after the first
2,000 reads.

`--cost`: seconds per clip of one reader, in this process, on the same folder's good videos: the unguarded
read, the guarded read (a long-lived reader process), and a fresh process for every clip.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package

import av
import numpy as np
import psutil

from configs import video as video_config
from t5jax.data import guarded, loader, video_dataset
from t5jax.data.video_synthetic import encode_video, synthetic_clip

# (codec, size, frames, group of pictures): every combination, a few videos of each.
CODECS, SIZES, LENGTHS, GOPS = ("libx264", "mpeg4"), (32, 64, 96), (16, 48, 96), (4, 12, 250)


def make_folder(root, per_kind=1):
  """The mixed videos and their annotation file (captions from the synthetic maker); returns its path."""
  os.makedirs(root, exist_ok=True)
  rows, n = [], 0
  for codec in CODECS:
    for size in SIZES:
      for frames in LENGTHS:
        for gop in GOPS:
          for _ in range(per_kind):
            clip, caption = synthetic_clip(np.random.default_rng(n), frames, size)
            name = f"{codec}_{size}_{frames}_g{gop}_{n}.mp4"
            if not os.path.exists(os.path.join(root, name)):
              encode_video(os.path.join(root, name), clip, 8, codec=codec, options={"g": str(gop)})
            rows.append((name, caption))
            n += 1
  rows += _broken(root, rows)
  path = os.path.join(root, "annotations.csv")
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([("path", "caption"), *rows])
  return path


def _broken(root, rows):
  """A copy of the longest H.264 video of groups of 4 with its middle packets overwritten (passes the probe
  with PyAV, fails at read), and one cut in half (left out by the index)."""
  name, caption = next((p, c) for p, c in rows if p.startswith("libx264_64_96_g4"))
  with av.open(os.path.join(root, name)) as container:
    stream = container.streams.video[0]
    packets = [(p.pos, p.size) for p in container.demux(stream) if p.size]
  data = bytearray(open(os.path.join(root, name), "rb").read())
  rng = np.random.default_rng(0)
  for pos, size in packets[24:72]:
    data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
  with open(os.path.join(root, "broken_middle.mp4"), "wb") as f:
    f.write(data)
  with open(os.path.join(root, "broken_cut.mp4"), "wb") as f:
    f.write(data[: len(data) // 2])
  return [("broken_middle.mp4", caption), ("broken_cut.mp4", caption)]


def video_settings(root, annotations, backend, read_timeout=30.0):
  v = video_config.video_data_config()
  v.update(root=root, annotations=annotations, backend=backend, size=(32, 32), num_frames=8, stride=2.0)
  v.update(eval_fraction=0.05, read_timeout=read_timeout, stride=2.0)
  return v


def rss_mb(proc):
  """{role: [MB, ...]}: RSS of `proc` (the trainer), its loader workers, their reader processes and
  multiprocessing's resource tracker."""
  out = {"trainer": [proc.memory_info().rss / 2**20], "workers": [], "readers": [], "tracker": []}
  for child in proc.children(recursive=True):
    try:
      if child.status() == psutil.STATUS_ZOMBIE:
        continue
      command = " ".join(child.cmdline())
      role = "readers" if "t5jax.data.guarded" in command else "tracker" if "resource_tracker" in command else "workers"
      out[role].append(child.memory_info().rss / 2**20)
    except psutil.NoSuchProcess:  # a reader replaced between the listing and the reading
      pass
  return out


def soak(args, annotations):
  v = video_settings(os.path.dirname(annotations), annotations, args.backend)
  data = video_dataset.build_video_data(
    v, os.path.join(args.cache, "cache"), targets_length=32, batch_size=args.batch_size, seed=0
  )
  it = loader.iterate_from(data.train, 0, num_workers=args.workers)
  me, reads, failed, rows, start = psutil.Process(), 0, 0, [], time.perf_counter()
  print(f"{data.source}; backend {args.backend}, {args.workers} workers, batches of {args.batch_size}", flush=True)
  while reads < args.reads:
    batch = next(it)
    failed += loader.take_failed_reads(batch)
    reads += len(batch["frames"])
    if reads % 1000 == 0:
      m = rss_mb(me)
      row = dict(reads=reads, seconds=round(time.perf_counter() - start, 1), failed_reads=failed)
      row.update({k: [round(x, 1) for x in xs] for k, xs in m.items()}, total=round(sum(map(sum, m.values())), 1))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if hasattr(it, "close"):
    it.close()
  base = next(r["total"] for r in rows if r["reads"] >= 2000)
  summary = dict(backend=args.backend, growth_after_2000_mb=round(rows[-1]["total"] - base, 1), rows=rows)
  print(f"growth after the first 2,000 reads: {summary['growth_after_2000_mb']} MB", flush=True)
  return summary


def cost(args, annotations):
  """Seconds per clip: unguarded, guarded by a long-lived reader process, and a fresh process per clip."""
  root = os.path.dirname(annotations)
  names = [p for p, _ in csv.reader(open(annotations)) if p.endswith(".mp4") and not p.startswith("broken")]
  sampler = video_dataset.sampler_from(video_settings(root, annotations, args.backend))
  paths = [os.path.join(root, names[i % len(names)]) for i in range(args.clips)]
  child, results = guarded.ChildProcess(timeout=30), {}
  child.call(sampler, paths[0], np.random.default_rng(0))  # the reader process's start is a one-off

  def fresh(path, rng):
    one = guarded.ChildProcess(timeout=30)
    try:
      return one.call(sampler, path, rng)
    finally:
      one.close()

  ways = {"unguarded": sampler, "guarded": lambda p, r: child.call(sampler, p, r), "process_per_clip": fresh}
  for way, read in ways.items():
    count = args.clips if way != "process_per_clip" else max(1, args.clips // 10)
    start = time.perf_counter()
    for i, path in enumerate(paths[:count]):
      read(path, np.random.default_rng(i))
    results[way] = (time.perf_counter() - start) / count
    print(f"{args.backend} {way}: {results[way] * 1e3:.2f} ms per clip ({count} clips)", flush=True)
  child.close()
  return dict(backend=args.backend, ms_per_clip={k: round(x * 1e3, 2) for k, x in results.items()})


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backend", default="decord", choices=("decord", "pyav"))
  p.add_argument("--reads", type=int, default=20000)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=20)
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "t5jax_video_soak"))
  p.add_argument("--cost", action="store_true", help="seconds per clip of each way to read instead")
  p.add_argument("--clips", type=int, default=300)
  p.add_argument("--out", help="append the result as a JSON line")
  args = p.parse_args()
  if 1000 % args.batch_size:
    p.error("--batch_size must divide 1,000 (memory is sampled every 1,000 reads)")
  annotations = make_folder(os.path.join(args.cache, "videos"))
  result = cost(args, annotations) if args.cost else soak(args, annotations)
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()

r"""Loader examples/s against what the train step of configs/base.py consumes (the headroom must be >= 10x).

  python benchmarks/loader_throughput.py [--workdir /tmp/t5jax_loader_bench] [--steps 200]
  python benchmarks/loader_throughput.py --video [--videos 64 --batch_size 32 --workers 0,2 --out v.jsonl]

Loader: configs/base.py's pipeline (embedded corpus, span corruption, batch 32) through `iterate_from`
with threads and with 2 worker processes, and the multitask mixture (configs/multitask.py) padded and
packed. Consumer: the jitted train step of configs/base.py's model on this machine.

`--video`: configs/video.py's loader over a folder of `--videos` mp4 files made by t5jax's synthetic-video
maker (read as a user's own folder and annotations are), each batch put on JAX's default device
(`jax.device_put`, waited for): clips/s host to device, against the clips/s configs/video.py's train step
consumes there. `--out FILE` appends the consumer's rate and each loader row as JSON lines.
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package

import devices
import jax
import numpy as np

from configs import base, multitask, video
from t5jax import parallel, setup
from t5jax.data import loader, pipeline, video_synthetic


def loader_rate(ds, steps, batch_size, num_workers, to_device=False):
  it = loader.iterate_from(ds, 0, num_workers=num_workers)
  next(it)  # worker start-up is a one-off, not throughput
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
    if to_device:
      jax.block_until_ready(jax.device_put(batch))
  rate = steps * batch_size / (time.perf_counter() - start)
  if hasattr(it, "close"):
    # grain 0.2.18's close can block for good draining a worker's queue (seen with video batches and 2
    # workers, the workers still filling their buffers): the rate is measured, so wait for it a bounded time.
    closing = threading.Thread(target=it.close, daemon=True)
    closing.start()
    closing.join(timeout=20)
    if closing.is_alive():
      print(f"  (the loader with {num_workers} workers did not close in 20 s; left behind)", flush=True)
  return rate


def train_rate(config, data, steps=20):
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    return _time_steps(
      run, [parallel.host_to_global(data.train[i], run.batch_sharding) for i in range(steps + 2)], steps
    )


def _time_steps(run, batches, steps):
  state, step = run.init_state(), run.train_step
  for b in batches[:2]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for b in batches[2:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  return steps * run.config.batch_size / (time.perf_counter() - start)


def text_rows(args):
  """configs/base.py's consumer rate and the rows (name, dataset, batch size, workers) of the text loaders."""
  config = base.get_config()
  data = pipeline.from_config(config, os.path.join(args.workdir, "cache"))
  consume = train_rate(config, data)
  print(f"configs/base.py train step consumes {consume:,.0f} examples/s on {jax.devices()[0].platform}")
  rows = [
    ("base: span corruption, threads", data.train, config.batch_size, 0),
    ("base: span corruption, 2 workers", data.train, config.batch_size, 2),
  ]
  fill = None  # the padded encoder's fill, measured first, compared with the packed one's
  for packed in (False, True):
    mt = multitask.get_config(None if packed else "unpacked")
    mdata = pipeline.from_config(mt, os.path.join(args.workdir, "cache"))
    name = "multitask, packed" if packed else "multitask, padded"
    rows += [(f"{name}, threads", mdata.train, mt.batch_size, 0), (f"{name}, 2 workers", mdata.train, mt.batch_size, 2)]
    if packed:
      b = mdata.train[0]
      print(
        f"multitask packing fills {np.mean(b['encoder_input_tokens'] > 0):.0%} of encoder and "
        f"{np.mean(b['decoder_target_tokens'] > 0):.0%} of decoder slots (padded: {fill:.0%} of encoder)"
      )
    else:
      fill = np.mean(mdata.train[0]["encoder_input_tokens"] > 0)
  return consume, rows


def video_rows(args):
  """configs/video.py's consumer rate (clips/s) and its loader's rows, over a folder of synthetic videos."""
  config = video.get_config()
  v = config.data.video
  folder = os.path.join(args.workdir, "videos")
  v.annotations = video_synthetic.make_synthetic_videos(
    folder, args.videos, num_frames=v.synthetic.num_frames, size=v.synthetic.size
  )
  v.root = folder
  config.batch_size = args.batch_size or config.batch_size
  data = pipeline.from_config(config, os.path.join(args.workdir, "video_cache"))
  consume = train_rate(config, data, args.train_steps)
  device = jax.devices()[0]
  print(
    f"configs/video.py train step consumes {consume:,.0f} clips/s on {device.platform} ({device.device_kind}); "
    f"{args.videos} synthetic videos, batch {config.batch_size}"
  )
  workers = [int(w) for w in args.workers.split(",")]
  names = {w: f"video: clips to device, {f'{w} workers' if w else 'threads'}" for w in workers}
  return consume, [(names[w], data.train, config.batch_size, w) for w in workers]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/t5jax_loader_bench")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--video", action="store_true", help="configs/video.py's loader, batches put on the device")
  parser.add_argument("--videos", type=int, default=64, help="video: synthetic videos made in WORKDIR/videos")
  parser.add_argument("--batch_size", type=int, help="video: clips per batch (default configs/video.py's)")
  parser.add_argument("--workers", default="0,2", help="video: loader worker processes to time (0: threads)")
  parser.add_argument("--train_steps", type=int, default=20, help="video: timed train steps of the consumer")
  parser.add_argument("--out", help="append the consumer's rate and each loader row to this file as JSON lines")
  args = parser.parse_args()
  consume, rows = (video_rows if args.video else text_rows)(args)
  record = devices.Record(args.out, benchmark="loader_throughput", video=args.video)
  record.write("consumer", per_s=consume, platform=jax.devices()[0].platform)
  unit, consumer = ("clips", "video") if args.video else ("examples", "base")
  for name, ds, batch, workers in rows:
    rate = loader_rate(ds, args.steps, batch, workers, to_device=args.video)
    print(f"  {name:38s} {rate:10,.0f} {unit}/s  ({rate / consume:6.1f}x the {consumer} train step)", flush=True)
    record.write("loader", name=name, workers=workers, per_s=rate, headroom=rate / consume)


if __name__ == "__main__":
  main()

r"""Loader examples/s against what the train step of configs/base.py consumes (the headroom must be >= 10x).

  python benchmarks/loader_throughput.py [--workdir /tmp/t5jax_loader_bench] [--steps 200]

Loader: configs/base.py's pipeline (embedded corpus, span corruption, batch 32) through `iterate_from`
with threads and with 2 worker processes, and the multitask mixture (configs/multitask.py) padded and
packed. Consumer: the jitted train step of configs/base.py's model on this machine.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package

import jax
import numpy as np

from configs import base, multitask
from t5jax import parallel, setup
from t5jax.data import loader, pipeline


def loader_rate(ds, steps, batch_size, num_workers):
  it = loader.iterate_from(ds, 0, num_workers=num_workers)
  next(it)  # worker start-up is a one-off, not throughput
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  rate = steps * batch_size / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/t5jax_loader_bench")
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
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
  for name, ds, batch, workers in rows:
    rate = loader_rate(ds, args.steps, batch, workers)
    print(f"  {name:38s} {rate:10,.0f} examples/s  ({rate / consume:6.1f}x the base train step)")


if __name__ == "__main__":
  main()

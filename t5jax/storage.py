"""Where a run's files live: a local path or a `gs://` URL, both through `etils.epath` (gcsfs on GCS).

GCS is not a POSIX disk, and the helpers here are written for both: an object appears whole or not at all
(`write_bytes` replaces a file whole: a local one through a temporary file and a rename, an object by one
upload), an append is a compose of the object and a new one (`append_bytes`), a rename is a copy and a
delete (`move`), and an exclusive create is a generation precondition (`create_exclusive`). What must be a
local file (a SentencePiece model, the data caches, a decoder's input) is kept in a local folder on purpose
(`local_cache`, `local_copy`).
"""

import hashlib
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
    if not text[len(REMOTE) :].split("/")[0]:
      raise ValueError(f"{what}={text}: no bucket named; e.g. gs://bucket/run")
    if importlib.util.find_spec("gcsfs") is None:
      raise ValueError(f"{what}={text}: gs:// paths need gcsfs (pip install -r requirements.txt)")
  return text


def probe(url, what="--workdir"):
  """A one-object write (then deleted) into gs:// `url`, with the account that will write there (on a TPU VM,
  each worker's service account): a refusal is a one-line ValueError saying what to do."""
  bucket = REMOTE + url[len(REMOTE) :].split("/")[0]
  grant = (
    f"gcloud storage buckets add-iam-policy-binding {bucket} --member=serviceAccount:ACCOUNT "
    "--role=roles/storage.objectAdmin"
  )
  path = join(url, f".write_probe.{os.getpid()}")
  try:
    write_bytes(path, b"")
    remove(path)
  except FileNotFoundError:  # gcsfs's answer to an upload into a bucket that does not exist
    raise ValueError(
      f"{what}={url}: the bucket {bucket} does not exist (gcloud storage buckets create {bucket})"
    ) from None
  except Exception as e:  # noqa: BLE001  (gcsfs raises HttpError, OSError("Forbidden"), auth errors, ...)
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if getattr(e, "code", None) == 401:  # GCS's answer to a request without credentials
      raise ValueError(
        f"{what}={url}: no credentials for GCS ({lines[0]}); run `gcloud auth application-default "
        "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key (a TPU or GCE VM "
        "uses its service account)"
      ) from None
    if lines[0].startswith("Forbidden"):  # gcsfs: "Forbidden: PATH", then GCS's reason on the next line
      who = re.match(r"(\S+@\S+) does not have", lines[-1])  # GCS names the account it refused
      if who:
        kind = "serviceAccount" if who.group(1).endswith(".gserviceaccount.com") else "user"
        grant = grant.replace("serviceAccount:ACCOUNT", f"{kind}:{who.group(1)}")
      raise ValueError(
        f"{what}={url}: this account may not write to {bucket} ({lines[-1]}); it needs "
        f"roles/storage.objectAdmin there: {grant}"
      ) from None
    raise ValueError(
      f"{what}={url} is not writable ({lines[0]}); the account needs roles/storage.objectAdmin on {bucket}: {grant}"
    ) from None


def is_remote(path):
  return os.fspath(path).startswith(REMOTE)


def absolute(path):
  """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b into ./gs:/b)."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def join(path, *names):
  return os.path.join(os.fspath(path), *names)  # "gs://b/run" + "x" -> "gs://b/run/x"


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
  epath.Path(path).mkdir(parents=True, exist_ok=True)  # nothing to make on GCS: prefixes are implicit


def read_bytes(path):
  return epath.Path(path).read_bytes()


def read_text(path):
  return epath.Path(path).read_text(encoding="utf-8")


def write_bytes(path, data):
  """Replaces the file at `path` with `data`, whole: a reader sees the old bytes or the new, never a part."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)  # an upload: the object appears when it is complete
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def append_bytes(path, data):
  """Adds `data` at the end of the existing file `path`. GCS has no append (gcsfs's mode "a" rewrites), so
  the new bytes are uploaded as an object of their own, and one compose request makes `path` the two joined,
  on the server: each append uploads only what it adds, and a reader sees the old object or the longer one."""
  if not is_remote(path):
    with open(path, "ab") as f:
      f.write(data)
    return
  # The part is not "<path>.part": one a killed append leaves behind must not pass for an event file (TensorBoard
  # reads every name holding "tfevents") or anything else a reader lists.
  directory, name = path.rsplit("/", 1)
  fs, part = _gcs(), f"{directory}/.append.{hashlib.md5(name.encode()).hexdigest()[:12]}.{os.getpid()}"
  fs.pipe(part, data)
  try:
    fs.merge(path, [path, part])
  finally:
    fs.rm(part)
    fs.invalidate_cache(path)


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
    fs.invalidate_cache()  # its cached listings would still show `src`
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
  return os.path.join(root, os.fspath(workdir)[len(REMOTE) :].strip("/"))


def local_copy(path, folder):
  """A local file with the bytes of `path`: the path itself if local, else a copy under the local `folder`
  (in a subfolder named by the URL's hash, so that two objects of one name never share a copy)."""
  if not is_remote(path):
    return os.fspath(path)
  url = os.fspath(path)
  local = os.path.join(folder, "files", hashlib.md5(url.encode()).hexdigest()[:12], os.path.basename(url))
  os.makedirs(os.path.dirname(local), exist_ok=True)
  data = read_bytes(url)
  if not os.path.isfile(local) or read_bytes(local) != data:
    write_bytes(local, data)
  return local

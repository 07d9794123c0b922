"""Where examples come from: the embedded corpus, the user's text or JSONL files, and TFDS datasets.

Every source here is random access (`len` and `[i]`), which is what grain's MapDataset needs for a dataset
indexed by step. Text format: UTF-8 plain text, one document per line. The embedded corpus folds each document's
newlines and whitespace runs into single spaces; T5's vocabulary cannot represent newlines anyway (its
nmt_nfkc normalization turns them into spaces), so nothing the model could see is lost.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import json
import logging
import os
import sysconfig
import time

# Directories of the standard library that are not prose: test suites (mostly code, huge), the IDLE GUI,
# and installed third-party packages (differ from machine to machine and would break determinism).
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
_MIN_DOC_CHARS = 40
# A document goes to eval when a hash of its text falls in this 1-in-50 bucket (~2%). Hashing the text,
# not the position, keeps a document's split stable when documents are added or removed around it.
_EVAL_BUCKETS = 50


def _docstrings_of_file(path: str) -> list[str]:
  """Module/class/function docstrings of one .py file, in source order; [] if it does not parse."""
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
    return []
  nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  # ast.walk is breadth-first; sort by line so a file's docstrings read in source order.
  nodes.sort(key=lambda n: getattr(n, "lineno", 0))
  docs = []
  for node in nodes:
    doc = ast.get_docstring(node, clean=False)
    if doc:
      docs.append(inspect.cleandoc(doc))
  # pydoc_data/topics.py holds the Language Reference as a dict of strings, not as docstrings: the longest
  # stretch of real prose in the standard library, so take it too.
  if path.endswith(os.path.join("pydoc_data", "topics.py")):
    for node in tree.body:
      if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
        docs.extend(v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
  return docs


def stdlib_documents(max_files: int | None = None) -> list[str]:
  """Deduplicated docstring documents of the standard library, in sorted file order.

  `max_files` takes only the first files (for fast tests); None takes all.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  docs, seen = [], set()
  for path in paths[:max_files]:
    for doc in _docstrings_of_file(path):
      doc = " ".join(doc.split())
      if len(doc) >= _MIN_DOC_CHARS and doc not in seen:  # many dunder docstrings repeat verbatim
        seen.add(doc)
        docs.append(doc)
  return docs


def is_eval_document(doc: str, eval_percent: int = 2) -> bool:
  """The deterministic ~`eval_percent`% held out for evaluation (md5 is stable across machines, unlike hash()).
  In steps of 2%: the held-out buckets of 50, so a larger share keeps every document of a smaller one."""
  digest = hashlib.md5(doc.encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "little") % _EVAL_BUCKETS < eval_percent // 2


def check_eval_percent(eval_percent: int) -> None:
  if eval_percent not in range(2, 100, 2):
    raise ValueError(f"config.data.source.eval_percent={eval_percent} must be an even number of percent, 2 to 98")


def write_lines_atomic(path: str, lines: list[str]) -> None:
  """Writes one line per item to `path` via a temporary file and os.replace (never half-written)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(line + "\n")
  os.replace(tmp, path)


def embedded_corpus(
  cache_dir: str | os.PathLike, max_files: int | None = None, eval_percent: int = 2
) -> tuple[str, str]:
  """Builds (or reuses) the standard-library docstring corpus; returns (train_path, eval_path).

  Written once to `cache_dir/corpus/{train,eval}.txt` (one document per line). The text depends only on
  the Python version, so every machine running the same Python trains on the same words. A `max_files`
  corpus is cached under its own name so it never masquerades as the full one.
  """
  name = "corpus" if max_files is None else f"corpus_{max_files}files"
  out_dir = os.path.join(os.fspath(cache_dir), name if eval_percent == 2 else f"{name}_eval{eval_percent}")
  train_path, eval_path = os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "eval.txt")
  if os.path.isfile(train_path) and os.path.isfile(eval_path):
    return train_path, eval_path
  os.makedirs(out_dir, exist_ok=True)
  docs = stdlib_documents(max_files)
  if not docs:
    raise ValueError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}")
  train = [d for d in docs if not is_eval_document(d, eval_percent)]
  evals = [d for d in docs if is_eval_document(d, eval_percent)]
  if not evals:  # a tiny max_files corpus may have no doc in the eval bucket; keep eval non-empty
    evals = [train.pop()]
  # eval first: train.txt's existence is the "cache complete" signal checked above.
  write_lines_atomic(eval_path, evals)
  write_lines_atomic(train_path, train)
  return train_path, eval_path


def expand_paths(path_or_glob: str | os.PathLike, kind: str = "text") -> list[str]:
  """The files a path or glob names, sorted; an error naming the pattern when there are none."""
  pattern = os.fspath(path_or_glob)
  paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
  if not paths:
    raise FileNotFoundError(f"no files match {pattern}")
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{kind} file not found: {path}")
  return paths


def read_lines(path: str) -> list[str]:
  """A file's lines (universal newlines, as text mode reads them); bytes that are not UTF-8 are an error
  naming the file and the byte offset."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text at byte {e.start} ({data[e.start : e.start + 4]!r}...)") from None
  return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_text_documents(path_or_glob: str | os.PathLike) -> list[str]:
  """Documents (non-empty lines) of a text file or of every file a glob matches, in sorted path order."""
  docs = []
  for path in expand_paths(path_or_glob):
    file_docs = [line.strip() for line in read_lines(path) if line.strip()]
    if not file_docs:
      raise ValueError(f"text file has no documents (empty): {path}")
    docs.extend(file_docs)
  return docs


class JsonlSource:
  """Random access to the records of JSONL files (one JSON object per line), loaded once into memory.

  A line that is not a JSON object is skipped and counted in `num_malformed` (a real corpus scraped from
  the web always has a few), unless `strict`, where it is an error naming file and line.
  """

  def __init__(self, path_or_glob: str | os.PathLike, strict: bool = False):
    self.records, self.num_malformed = [], 0
    for path in expand_paths(path_or_glob, "JSONL"):
      for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:
          if strict:
            raise ValueError(f"{path}:{lineno}: malformed JSONL line ({e})") from None
          self.num_malformed += 1
          continue
        self.records.append(record)
    if self.num_malformed:
      logging.warning("%s: skipped %d malformed JSONL lines", path_or_glob, self.num_malformed)
    if not self.records:
      raise ValueError(f"no records in {path_or_glob} (empty, or every line malformed)")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def tfds_source(name: str, split: str, data_dir: str | None):
  """A TFDS split as a random-access source, read from its ArrayRecord files with no TensorFlow.

  Never downloads: a dataset that is not prepared in `data_dir` is an error that says how to prepare it.
  """
  import tensorflow_datasets as tfds  # heavy import, only for runs that read TFDS

  how = (
    f"Prepare it once (this downloads) with: tfds build {name.split('/')[0]} "
    f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record (or a builder's "
    f"download_and_prepare(file_format='array_record') in Python), then pass --config.data.source.data_dir"
  )
  try:
    # Without TensorFlow some builders (c4 among them) cannot even be imported, so tfds only finds a
    # dataset through its prepared files: "not found" then means "not prepared here".
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    first = str(e).splitlines()[0]
    where = data_dir or "the default data_dir (~/tensorflow_datasets)"
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {where} ({first}). {how}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. {how}")
  if "array_record" not in str(builder.info.file_format).lower():
    raise ValueError(
      f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format}; "
      f"random access without TensorFlow needs file_format='array_record'"
    )
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


if __name__ == "__main__":
  import sys
  import tempfile

  start = time.perf_counter()
  train_path, eval_path = embedded_corpus(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
  for p in (train_path, eval_path):
    print(f"{p}: {os.path.getsize(p) / 1e6:.2f} MB, {len(read_text_documents(p))} documents")
  print(f"built in {time.perf_counter() - start:.1f} s")

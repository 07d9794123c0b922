"""A run's record in its workdir: config.json (the config, git hash, data source) and the tokenizer it
trained with, copied beside it so predict and evaluate use exactly that one.

  DIR/config.json            {"config": ..., "git": ..., "data": {"source", "skipped"}, "tokenizer": {...}}
  DIR/spiece.model           the SentencePiece model of the run (as in a Hugging Face T5 directory)
  DIR/tokenizer.json         the same for transformers, with tokenizer_config.json (which also gives
  DIR/tokenizer_config.json  `data.tokenizer.load_tokenizer(DIR)` the extra ids), as export-hf writes them
"""

import hashlib
import json
import os
import subprocess

from t5jax import storage
from t5jax.data.tokenizer import Tokenizer, write_hf_tokenizer
from t5jax.model import T5Config

CONFIG_FILE = "config.json"
SPIECE = "spiece.model"


def git_hash():
  """The commit of the code that runs (computed once per run), or "unknown" outside a git checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def md5_file(path):
  return hashlib.md5(storage.read_bytes(path)).hexdigest()  # tokenizer models: a few MB at most


def check_tokenizer(workdir, tokenizer):
  """Refuses to continue a run in `workdir` with a tokenizer other than the one it trained with."""
  saved = os.path.join(workdir, SPIECE)
  if storage.isfile(saved) and md5_file(saved) != md5_file(tokenizer.model_path):
    raise ValueError(
      f"{workdir} was trained with the tokenizer {saved}, but this run's data gives "
      f"{tokenizer.model_path}, which differs; use a new --workdir or the same data settings"
    )


def record_run(workdir, config, git, data):
  """Writes config.json and copies the run's tokenizer into `workdir` (process 0, once the run starts)."""
  tokenizer = data.tokenizer
  write_hf_tokenizer(tokenizer, workdir)
  _write_json(
    os.path.join(workdir, CONFIG_FILE),
    {
      "config": config.to_dict(),
      "git": git,
      "data": {"source": data.source, "skipped": dict(data.skipped)},
      "tokenizer": {
        "file": SPIECE,
        "md5": md5_file(tokenizer.model_path),
        "extra_ids": tokenizer.extra_ids,
        "trained_from": os.path.abspath(tokenizer.model_path),
      },
    },
  )


def read_record(workdir):
  """The parsed config.json of a training workdir, its config in today's keys (`current_keys`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    record = json.loads(storage.read_text(path))
    if isinstance(record.get("config"), dict):
      record["config"] = current_keys(record["config"])
    return record
  except OSError as e:
    raise FileNotFoundError(f"{path}: cannot read the run's record ({e.strerror or e})") from None
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def current_keys(config):
  """A run config's dict in today's keys, so a record written by an older t5jax compares and loads as one
  written now: the model as T5Config writes it (the moe and video groups, only when used, for the flat
  num_experts / moe_* / video_* keys), and no `data.video` group in a run that reads no video."""
  config = dict(config)
  if isinstance(config.get("model"), dict):
    config["model"] = T5Config.from_dict(config["model"]).to_dict()
  data = config.get("data")
  if isinstance(data, dict) and data.get("kind") != "video":
    config["data"] = {k: v for k, v in data.items() if k != "video"}
  return config


def is_run_record(directory):
  """Whether `directory` holds a t5jax run's config.json (not a Hugging Face one)."""
  try:
    return "config" in read_record(directory) and "git" in read_record(directory)
  except (OSError, ValueError):
    return False


def load_run_tokenizer(workdir):
  """The tokenizer a training workdir recorded: its spiece.model, checked against the recorded hash."""
  recorded = read_record(workdir).get("tokenizer")
  if not recorded:
    raise FileNotFoundError(
      f"{os.path.join(workdir, CONFIG_FILE)} records no tokenizer (a run from an older "
      f"t5jax); copy its SentencePiece model to {os.path.join(workdir, SPIECE)}"
    )
  path = os.path.join(workdir, recorded["file"])
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path}: the tokenizer this run trained with is missing")
  if md5_file(path) != recorded["md5"]:
    raise ValueError(f"{path} differs from the tokenizer this run trained with (md5 {recorded['md5']})")
  local = storage.local_copy(path, storage.local_cache(workdir))  # sentencepiece reads local files only
  return Tokenizer(local, extra_ids=recorded["extra_ids"])


def _write_json(path, obj):
  storage.write_text(path, json.dumps(obj, indent=2))

"""Shared test fixtures: a small real text corpus and the command line that trains on it."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the whole session, inherited by every train / predict / launch.sh
# subprocess: many tests compile the same tiny train step, and a cache hit turns ~5 s of compiling into a
# file read. Fresh per session (never reused across code changes); set before any test module imports jax.
_XLA_CACHE = tempfile.mkdtemp(prefix="t5jax_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

WORDS = ("the a model learns tokens from text while spans of words are masked and predicted by a decoder "
         "that reads the encoder states attention heads share one relative position table per stack").split()


def write_corpus(path, num_docs=3000, seed=0):
  """Documents of random words with a little structure (repeated phrases), one per line."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(num_docs):
      n = int(rng.integers(20, 60))
      start = int(rng.integers(0, len(WORDS)))
      words = [WORDS[(start + i) % len(WORDS)] if rng.random() < 0.7 else WORDS[rng.integers(len(WORDS))]
               for i in range(n)]
      f.write(" ".join(words) + "\n")
  return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus") / "train.txt"))


def predict_in_process(**flag_values):
  """`t5jax.predict`'s run() with these flag values, in this process (error cases need no subprocess)."""
  from absl import flags
  from absl.testing import flagsaver
  from t5jax import predict as predict_cli
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    predict_cli.run([])


def tiny_flags(corpus):
  """Overrides that make configs/base.py train a very small model on the test corpus in seconds."""
  return [
      f"--config.data.source.text_glob={corpus}", "--config.data.tokenizer.spm_vocab_size=300", "--config.data.inputs_length=32",
      "--config.model.vocab_size=512", "--config.model.d_model=32", "--config.model.num_heads=2",
      "--config.model.d_kv=16", "--config.model.d_ff=64", "--config.model.num_encoder_layers=2",
      "--config.model.num_decoder_layers=2", "--config.batch_size=8", "--config.eval_steps=2",
  ]


def tiny_config(corpus):
  """configs/base.py with `tiny_flags`' settings, for running `t5jax.train.run` in the test process."""
  from configs import base
  config = base.get_config()
  for flag in tiny_flags(corpus):
    key, _, value = flag.removeprefix("--config.").partition("=")
    *path, name = key.split(".")
    section = config
    for part in path:
      section = section[part]
    section[name] = type(section[name])(value) if section[name] is not None else value
  return config


def train_command(workdir, *flags):
  return [sys.executable, "-m", "t5jax.train", f"--config={ROOT}/configs/base.py", f"--workdir={workdir}",
          *flags]


def run_train(workdir, *flags, timeout=600):
  return subprocess.run(train_command(workdir, *flags), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def start_until_step(command, workdir, step, timeout=300):
  """Starts a training command and returns its still-running process once metrics.jsonl shows `step`."""
  from t5jax.metrics import read_metrics
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(r["step"] >= step for r in read_metrics(metrics)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
  return proc


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)

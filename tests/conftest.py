"""Shared test fixtures: a small real text corpus and the command line that trains on it."""

import importlib.metadata
import os
import shutil
import socket
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
# XLA's CPU compiler without its LLVM optimizations and with its older, cheaper fusion emitters, for this
# process and every subprocess: the tests' models are tiny, so compiling, not running, is most of the suite's
# time, and these halve a tiny train run's CPU seconds. The programs mean the same (no fast math either way).
# jaxlib 0.11.1 dropped the older emitters and with them the flag, which XLA then rejects as unknown (a fatal
# abort of every process that starts a backend); read from the metadata, since importing jax now would be too early.
_JAXLIB = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:3] if part.isdigit())
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0" + (
  " --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11, 1) else ""
)
# Once: the compilation cache keys on the flags' text, and a pytest-xdist worker imports this file again under
# its controller's environment, so flags added twice would give the workers' programs other keys.
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

WORDS = (
  "the a model learns tokens from text while spans of words are masked and predicted by a decoder "
  "that reads the encoder states attention heads share one relative position table per stack"
).split()


def write_corpus(path, num_docs=3000, seed=0):
  """Documents of random words with a little structure (repeated phrases), one per line."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(num_docs):
      n = int(rng.integers(20, 60))
      start = int(rng.integers(0, len(WORDS)))
      words = [
        WORDS[(start + i) % len(WORDS)] if rng.random() < 0.7 else WORDS[rng.integers(len(WORDS))] for i in range(n)
      ]
      f.write(" ".join(words) + "\n")
  return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus") / "train.txt"))


def free_port():
  """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def host_devices_env(count=None, **extra):
  """os.environ (plus `extra`) for a subprocess whose JAX sees `count` CPU devices, or the default number when
  None; the tests' XLA flags stay, any other device count set outside the tests goes."""
  devices = f" --xla_force_host_platform_device_count={count}" if count else ""
  return dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS + devices, **extra)


# Why a Hugging Face parity module (`pytestmark = pytest.mark.needs_torch`) is skipped where torch and
# transformers are not installed: the Python 3.12 leg has no CPU torch build, and `-m "not needs_torch"` there
# leaves these modules out by name. Each module calls importorskip itself, so the skip names the module.
NEEDS_TORCH = "needs torch and transformers (the Hugging Face parity tests); not installed here"


def predict_in_process(**flag_values):
  """`t5jax.predict`'s run() with these flag values, in this process (error cases need no subprocess)."""
  from absl import flags
  from absl.testing import flagsaver
  from t5jax import predict as predict_cli

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    predict_cli.run([])


# The tests' very small model and batch, for any config.
TINY_MODEL = [
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.d_kv=16",
  "--config.model.d_ff=64",
  "--config.model.num_encoder_layers=2",
  "--config.model.num_decoder_layers=2",
  "--config.batch_size=8",
]


def tiny_flags(corpus):
  """Overrides that make configs/base.py train a very small model on the test corpus in seconds."""
  return [
    f"--config.data.source.text_glob={corpus}",
    "--config.data.tokenizer.spm_vocab_size=300",
    "--config.data.inputs_length=32",
    "--config.model.vocab_size=512",
    *TINY_MODEL,
    "--config.eval_steps=2",
  ]


# A finished two-step run of tiny_flags' model (a checkpoint at step 2, a metrics row per step).
TINY_RUN_STEPS = [
  "--config.total_steps=2",
  "--config.eval_every=2",
  "--config.checkpoint_every=2",
  "--config.log_every=1",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file):
  """A workdir trained by `tiny_flags` + TINY_RUN_STEPS, shared by the modules that only read it."""
  wd = str(tmp_path_factory.mktemp("tiny_run"))
  out = run_train(wd, *tiny_flags(corpus_file), *TINY_RUN_STEPS)
  assert out.returncode == 0, out.stderr[-2000:]
  return wd


# A mixture-of-experts model for the tiny runs: configs/moe.py with 4 experts, in every decoder FFN and every
# second encoder one. As a `--config=` flag among a command's flags, it replaces configs/base.py.
MOE_FLAGS = [
  f"--config={ROOT}/configs/moe.py:4",
  "--config.model.moe.every_encoder=2",
  "--config.model.moe.every_decoder=1",
]


def config_and_flags(flags):
  """(the `--config=FILE[:arg]` flag, default configs/base.py's, and the other flags) of a command's flags."""
  named = [f for f in flags if f.startswith("--config=")]
  return (named[-1] if named else f"--config={ROOT}/configs/base.py"), [f for f in flags if f not in named]


def config_from(*flags):
  """The config a `python -m t5jax.train` command with `flags` trains: configs/base.py (or the
  `--config=FILE[:arg]` among them) with the `--config.key=value` overrides (numbers and strings) applied."""
  import importlib.util

  config_flag, overrides = config_and_flags(flags)
  path, _, arg = config_flag.removeprefix("--config=").partition(":")
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for flag in overrides:
    key, _, value = flag.removeprefix("--config.").partition("=")
    *path, name = key.split(".")
    section = config
    for part in path:
      section = section[part]
    current = section[name]
    if isinstance(current, bool):  # bool("false") is True
      value = {"true": True, "false": False}[value.lower()]
    section[name] = type(current)(value) if current is not None else value
  return config


def tiny_config(corpus, *extra):
  """configs/base.py (or the `--config=FILE[:arg]` among `extra`) with `tiny_flags`' settings and then `extra`
  ones, for running `t5jax.train.run` in a process of ours."""
  return config_from(*tiny_flags(corpus), *extra)


def train_command(workdir, *flags):
  """`python -m t5jax.train` of configs/base.py, or of the `--config=FILE[:arg]` among `flags`."""
  config_flag, flags = config_and_flags(flags)
  return [sys.executable, "-m", "t5jax.train", config_flag, f"--workdir={workdir}", *flags]


def tiny_distill_command(workdir, *extra):
  """configs/distill.py:uld at a tiny size through distillation's two steps: with no teacher set, it trains one
  (3 steps) first."""
  return [
    sys.executable,
    "-m",
    "t5jax.distill",
    f"--config={ROOT}/configs/distill.py:uld",
    f"--workdir={workdir}",
    "--config.batch_size=8",
    "--config.model.d_model=16",
    "--config.model.num_heads=2",
    "--config.model.d_kv=8",
    "--config.model.d_ff=32",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
    "--config.distill.teacher_train.model.d_model=32",
    "--config.distill.teacher_train.model.d_ff=64",
    "--config.distill.teacher_train.total_steps=3",
    "--config.total_steps=8",
    "--config.log_every=1",
    "--config.eval_every=100",
    "--config.eval_steps=1",
    "--config.checkpoint_every=100",
    "--config.decode_eval_every=0",
    *extra,
  ]


def run_train(workdir, *flags, timeout=600):
  return subprocess.run(train_command(workdir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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


# For a kill-and-resume test of a model or data kind (its rng, adapters, mixture): the loader in background
# threads. Worker processes, which cost each of the test's three runs ~5 s of CPU, are test_train's and
# test_multitask's kill-and-resume concern.
NO_LOADER_WORKERS = "--config.data.num_workers=0"


def assert_resumes_exactly(tmp_path, corpus, total_steps, kill_after, *extra):
  """benchmarks/kill_resume.py's run (a checkpoint saved asynchronously every step, loader workers running
  unless `extra` says NO_LOADER_WORKERS) SIGKILLed as soon as it logs step `kill_after`, so a save is in
  flight, then rerun: it resumes from a checkpoint (not from scratch) and ends bitwise like a run never
  interrupted: every logged loss and grad norm and every final param. Returns the uninterrupted run's outcome.
  The benchmark kills at random moments."""
  from benchmarks import kill_resume
  from t5jax.metrics import read_metrics

  steps = [f"--config.total_steps={total_steps}", f"--config.eval_every={total_steps // 2}", *extra]
  out = subprocess.run(
    kill_resume.command(str(tmp_path / "reference"), corpus, *steps), cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  reference = kill_resume.outcome(str(tmp_path / "reference"))
  assert sorted(reference[0]) == list(range(1, total_steps + 1))
  killed = kill_resume.kill_and_resume(str(tmp_path / "killed"), corpus, 0.0, *steps, after_step=kill_after)
  assert killed is not None and kill_after <= killed < total_steps, killed
  logged = [r["step"] for r in read_metrics(str(tmp_path / "killed" / "metrics.jsonl")) if "loss" in r]
  assert logged.count(1) == 1 and logged[-1] == total_steps, logged  # the rerun went on from a saved step
  assert kill_resume.same(kill_resume.outcome(str(tmp_path / "killed")), reference)
  return reference


# The modules that take longest, slowest first (one worker's seconds, measured with --durations). pyproject
# hands whole modules to the two xdist workers in collection order (--dist=loadfile --no-loadscope-reorder):
# starting the long poles first lets the short modules fill in behind them, so both workers end together.
SLOWEST_FIRST = [
  "test_parallel.py",
  "test_lora.py",
  "test_train.py",
  "test_gcs_workdir.py",
  "test_blockwise.py",
  "test_workdir_safety.py",
  "test_run_lock.py",
  "test_hf.py",
  "test_hf_convert.py",
  "test_lora_peft.py",
  "test_moe.py",
  "test_distill.py",
  "test_decode.py",
  "test_model.py",
  "test_predict.py",
  "test_multitask.py",
  "test_setup.py",
  "test_moe_checkpoints.py",
  "test_launch_and_sweep.py",
  "test_data_pipeline.py",
  "test_video_pipeline.py",
  "test_video_guard.py",
  "test_losses.py",
]


def tensorboard_scalars(data):
  """[(step, tag, value)] of the scalars in the bytes of a TensorBoard event file."""
  from tensorboardX.proto import event_pb2

  scalars = []
  while data:  # TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc
    length = int.from_bytes(data[:8], "little")
    event = event_pb2.Event.FromString(data[12 : 12 + length])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    data = data[16 + length :]
  return scalars


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its own order


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)

"""A mistaken rerun never costs a trained model: a changed config is refused before anything is touched (a
damaged checkpoint is what moves aside), a full disk is one line, and a killed conversion leaves nothing half
written. (One trainer per workdir: tests/test_run_lock.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import MOE_FLAGS, ROOT, run_train, tiny_config, tiny_flags
from t5jax import train
from t5jax.metrics import read_metrics

FOUR_STEPS = ["--config.total_steps=4", "--config.checkpoint_every=2", "--config.eval_every=4", "--config.log_every=2"]


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _snapshot(workdir):
  """What a refused run must leave as it was: every file's size and mtime."""
  return {
    os.path.relpath(os.path.join(d, f), workdir): os.stat(os.path.join(d, f))[6:9:2]
    for d, _, fs in os.walk(workdir)
    for f in fs
  }


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory, corpus_file):
  """A finished run of tiny_flags' model: checkpoints at steps 2 and 4, copied fresh for each test."""
  wd = str(tmp_path_factory.mktemp("four") / "run")
  out = run_train(wd, *tiny_flags(corpus_file), *FOUR_STEPS)
  assert out.returncode == 0, out.stderr[-2000:]
  return wd


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path / "run")
  return str(tmp_path / "run")


def _config(corpus, *extra):
  """tiny_config of the four-step run with `extra` flags; "MOE" stands for conftest's MOE_FLAGS (an MoE model)."""
  flags = [f for x in extra for f in (MOE_FLAGS if x == "MOE" else [x])]
  return tiny_config(corpus, *FOUR_STEPS, *flags)


def test_a_mistyped_model_is_refused_in_one_line_and_moves_nothing(four_step_run, tmp_path, corpus_file):
  wd = _copy(four_step_run, tmp_path)
  before = _snapshot(wd)
  out = run_train(wd, *tiny_flags(corpus_file), *FOUR_STEPS, "--config.total_steps=6", "--config.model.d_model=48")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines() == [
    f"t5jax.train: error: config.model.d_model=48 differs from 32 in the run that {wd} holds; rerun with that "
    f"run's settings ({wd}/config.json), or train in a new --workdir (add --config.init_from={wd} to start "
    "from its weights)"
  ]
  assert _snapshot(wd) == before and not os.path.exists(f"{wd}/unreadable")
  # Without the record, the checkpoint's own layout says the same, naming the param and both shapes.
  os.remove(f"{wd}/config.json")
  out = run_train(wd, *tiny_flags(corpus_file), *FOUR_STEPS, "--config.total_steps=6", "--config.model.d_model=48")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
    f"t5jax.train: error: checkpoint step 4 in {wd}/checkpoints does not fit this config: "
    "params/decoder/final_norm/scale is (32,) float32 in the checkpoint and (48,) float32 in this config; "
    f"nothing was moved. Rerun with the run's own settings ({wd}/config.json), or train in a new --workdir "
    f"(add --config.init_from={wd} to start from its weights)"
  )
  assert _steps(wd) == [2, 4] and not os.path.exists(f"{wd}/unreadable")
  # The right command then resumes from the last step, and says what it changed.
  out = run_train(wd, *tiny_flags(corpus_file), *FOUR_STEPS, "--config.total_steps=6")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Resuming from step 4" in out.stdout and _steps(wd) == [2, 4, 6]


@pytest.mark.parametrize(
  "override,words",
  [
    ("--config.batch_size=16", ["config.batch_size=16 differs from 8", "counted in steps of batch_size"]),
    ("--config.seed=1", ["config.seed=1 differs from 0", "data order"]),
    ("--config.optimizer.name=adamw", ["config.optimizer.name='adamw' differs from 'adafactor'"]),
    ("MOE", ["config.model.moe.num_experts=4 differs from '(absent)'"]),
    ("--config.data.inputs_length=64", ["config.data.inputs_length=64 differs from 32"]),
    ("--config.loss.z_loss=0.0", ["config.loss.z_loss=0.0 differs from 0.0001"]),
  ],
)
def test_settings_that_define_the_run_may_not_change(four_step_run, tmp_path, corpus_file, override, words):
  wd = _copy(four_step_run, tmp_path)
  before = _snapshot(wd)
  with pytest.raises(ValueError) as e:
    train.run(_config(corpus_file, override), wd)
  assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
  assert _snapshot(wd) == before


@pytest.mark.parametrize(
  "override,words",
  [
    ("--config.optimizer.name=adamw", ["opt_state/0/mu/", "is in this config's state but not in the checkpoint"]),
    ("MOE", ["params/decoder/layers_0/mlp/experts", "in this config's state but not"]),
    ("--config.model.scan_layers=true", ["params/decoder/layers/", "not in the checkpoint"]),
    (
      "--config.model.vocab_size=640",
      ["params/lm_head/kernel is (32, 512) float32 in the checkpoint and (32, 640) float32 in this config"],
    ),
  ],
)
def test_a_checkpoint_that_does_not_fit_is_named_and_kept(four_step_run, tmp_path, corpus_file, override, words):
  """The second line of defence, for a workdir whose record is gone (or a checkpoint copied in by hand)."""
  wd = _copy(four_step_run, tmp_path)
  os.remove(f"{wd}/config.json")
  before = _snapshot(wd)
  with pytest.raises(ValueError, match="checkpoint step 4 in .* does not fit this config: ") as e:
    train.run(_config(corpus_file, override), wd)
  assert all(w in str(e.value) for w in words), str(e.value)
  assert _snapshot(wd) == before


def test_what_may_change_on_resume_does_and_is_reported(four_step_run, tmp_path, corpus_file, capsys):
  wd = _copy(four_step_run, tmp_path)
  train.run(
    _config(
      corpus_file,
      "--config.total_steps=6",
      "--config.log_every=1",
      "--config.data.num_workers=1",
      "--config.optimizer.schedule=cosine",
    ),
    wd,
  )
  out = capsys.readouterr().out
  assert (
    "note: resuming with changed settings: config.data.num_workers 0 -> 1, config.log_every 2 -> 1, "
    "config.optimizer.schedule 'rsqrt' -> 'cosine', config.total_steps 4 -> 6"
  ) in out
  # Warmup is 50 steps: cosine's warmup gives 0.01 * 4 / 50 at step 4, where rsqrt held 0.01.
  assert "note: the learning rate at step 4 is 0.0008, where the recorded run's schedule gives 0.01" in out
  assert "Resuming from step 4" in out and _steps(wd) == [2, 4, 6]
  assert [r["step"] for r in read_metrics(f"{wd}/metrics.jsonl") if "loss" in r] == [2, 4, 5, 6]
  assert json.load(open(f"{wd}/config.json"))["config"]["total_steps"] == 6


def test_a_workdir_without_a_checkpoint_takes_any_config(tmp_path, corpus_file):
  """Nothing to lose: a first run that failed before its first save can be fixed and rerun."""
  wd = str(tmp_path / "run")
  diverges = [
    "--config.optimizer.name=adamw",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.learning_rate=1e30",
    "--config.log_every=1",
    "--config.checkpoint_every=100",
  ]
  with pytest.raises(FloatingPointError):  # at step 2, before any save
    train.run(_config(corpus_file, *diverges), wd)
  assert os.path.isfile(f"{wd}/config.json") and not _steps(wd)
  train.run(_config(corpus_file, "--config.model.d_model=48", "--config.total_steps=2"), wd)
  assert _steps(wd) == [2]


def test_converted_directories_are_not_workdirs(tiny_run, tmp_path, corpus_file):
  from t5jax import convert

  export, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
  convert.export_hf(tiny_run, export)
  convert.import_hf(export, imported)
  before = _snapshot(export)
  with pytest.raises(
    ValueError,
    match=rf"{export}/config.json is not a t5jax run's record .* would overwrite "
    rf"it: use a new --workdir, with --config.init_from={export}",
  ):
    train.run(_config(corpus_file), export)
  assert _snapshot(export) == before
  before = _snapshot(imported)
  with pytest.raises(ValueError, match="checkpoint step 0 in .* does not fit this config: it holds weights only"):
    train.run(_config(corpus_file), imported)
  assert _snapshot(imported) == before


@pytest.fixture
def small_disk(tmp_path):
  """A tmpfs to fill up (the tests run as root); skipped where mounting is refused."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def _resize(mount, kib):
  subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_restores(four_step_run, small_disk, corpus_file):
  wd = str(small_disk / "run")
  shutil.copytree(four_step_run, wd)
  used_kib = int(subprocess.run(["du", "-sk", wd], capture_output=True, text=True).stdout.split()[0])
  checkpoint_kib = int(
    subprocess.run(["du", "-sk", f"{wd}/checkpoints/4"], capture_output=True, text=True).stdout.split()[0]
  )
  _resize(small_disk, used_kib + checkpoint_kib // 2)  # room for the logs, not for another checkpoint
  more = [*tiny_flags(corpus_file), *FOUR_STEPS, "--config.total_steps=8", "--config.keep_checkpoints=10"]
  out = run_train(wd, *more)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines() == [
    f"t5jax.train: error: {wd}/checkpoints: saving checkpoint step 6 failed (no space left on device); the last "
    "complete checkpoint is step 4. Make room (or fix the directory) and rerun the same command to resume"
  ]
  _resize(small_disk, 64 * 1024)
  out = run_train(wd, *more)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Resuming from step 4" in out.stdout and _steps(wd) == [2, 4, 6, 8]


# convert.main with a real SIGKILL (or Ctrl-C) of its own process once the output's files are written into
# the temporary directory, before the rename that publishes it: the worst moment to die.
INTERRUPTED_CONVERT = """
import os, signal, sys, time
from t5jax import convert
from t5jax.workdir import checkpoint
from t5jax.hf import t5 as hf
how, args = sys.argv[1], sys.argv[2:]
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's KeyboardInterrupt, even if a parent ignores it
def interrupt(*written):
  os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGINT)
  time.sleep(30)
save_hf, save = hf.save_hf, checkpoint.Checkpoints.save
hf.save_hf = lambda *a: interrupt(save_hf(*a))
checkpoint.Checkpoints.save = lambda self, *a: interrupt(save(self, *a))
sys.exit(convert.main(args))
"""


def _convert(*args, interrupt=None):
  prefix = ["-c", INTERRUPTED_CONVERT, interrupt] if interrupt else ["-m", "t5jax.convert"]
  return subprocess.run([sys.executable, *prefix, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _leftovers(out):
  return [n for n in os.listdir(os.path.dirname(out)) if n.startswith(os.path.basename(out) + ".tmp-")]


def test_a_killed_conversion_leaves_nothing_half_written_and_the_rerun_completes(tiny_run, tmp_path):
  import t5jax

  want, _ = t5jax.load_checkpoint(tiny_run)
  exported, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
  for command, src, out in (("export-hf", tiny_run, exported), ("import-hf", exported, imported)):
    killed = _convert(command, src, out, interrupt="kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(out) and len(_leftovers(out)) == 1  # the partial output, never published
    again = _convert(command, src, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed" in again.stderr and "the partial output of a conversion that was killed" in again.stderr
    assert not _leftovers(out)
    got, _ = t5jax.load_checkpoint(out)
    assert jax_tree_equal(got, want)
  # Ctrl-C: one line, exit 130, nothing written; an existing output is never merged into.
  stopped = _convert("export-hf", tiny_run, str(tmp_path / "hf2"), interrupt="int")
  assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
  assert stopped.stderr.strip().splitlines() == [f"t5jax.convert: error: interrupted; {tmp_path}/hf2 was not written"]
  assert not os.path.exists(tmp_path / "hf2") and not _leftovers(str(tmp_path / "hf2"))
  again = _convert("export-hf", tiny_run, exported)
  assert again.returncode == 1 and "not empty; refusing to overwrite it" in again.stderr
  assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
  # Another conversion writing the same output at this moment: refused, its partial output left alone.
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    os.makedirs(f"{tmp_path}/hf3.tmp-{live.pid}")
    out = _convert("export-hf", tiny_run, str(tmp_path / "hf3"))
    assert out.returncode == 1 and f"another conversion (pid {live.pid}) is writing it" in out.stderr
    assert os.path.isdir(f"{tmp_path}/hf3.tmp-{live.pid}")
  finally:
    live.kill()
    live.wait()


def jax_tree_equal(a, b):
  import jax
  import numpy as np

  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )

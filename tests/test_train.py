"""End to end through the real CLI: a run learns, resumes bit-exactly after SIGKILL, stops cleanly on SIGTERM
and on a non-finite loss, and rejects bad input with a one-line error."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, run_train, start_until_step, tiny_config, tiny_flags, train_command
from t5jax.metrics import read_metrics


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r}


def test_a_run_learns_and_writes_its_record(tmp_path, corpus_file):
  wd = str(tmp_path / "run")
  out = run_train(wd, *tiny_flags(corpus_file), "--config.total_steps=60", "--config.log_every=10",
                  "--config.eval_every=30", "--config.checkpoint_every=30", "--config.optimizer.warmup_steps=10",
                  "--config.optimizer.learning_rate=0.02")
  assert out.returncode == 0, out.stderr[-2000:]
  rows = read_metrics(f"{wd}/metrics.jsonl")
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
  assert [r["step"] for r in evals] == [30, 60]
  for key in ("loss", "z_loss", "accuracy", "lr", "grad_norm", "tokens_per_s"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert _steps(wd) == [30, 60]
  saved = json.load(open(f"{wd}/config.json"))
  assert saved["config"]["total_steps"] == 60 and saved["git"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{wd}/tensorboard"))
  assert "ETA" in out.stdout
  # A rerun of a finished run resumes at the end and trains nothing more.
  again = run_train(wd, *tiny_flags(corpus_file), "--config.total_steps=60", "--config.log_every=10",
                    "--config.eval_every=30", "--config.checkpoint_every=30")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resuming from step 60" in again.stdout
  assert read_metrics(f"{wd}/metrics.jsonl") == rows


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, corpus_file):
  common = [*tiny_flags(corpus_file), "--config.total_steps=40", "--config.log_every=1",
            "--config.eval_every=20"]
  run_a = str(tmp_path / "a")
  out = run_train(run_a, *common, "--config.checkpoint_every=10")
  assert out.returncode == 0, out.stderr[-2000:]

  # Run B saves at every step, so the kill most likely lands in the middle of an async save.
  run_b = str(tmp_path / "b")
  flags_b = [*common, "--config.checkpoint_every=1", "--config.keep_checkpoints=2"]
  proc = start_until_step(train_command(run_b, *flags_b), run_b, 23)
  metrics = os.path.join(run_b, "metrics.jsonl")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r["step"] for r in read_metrics(metrics))
  assert killed_at < 40

  out = run_train(run_b, *flags_b)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Resuming from step" in out.stdout
  resumed_from = int(out.stdout.split("Resuming from step ")[1].split()[0])
  assert 1 <= resumed_from <= killed_at
  logged = [r["step"] for r in read_metrics(f"{run_b}/metrics.jsonl") if "loss" in r]
  assert logged == list(range(1, 41))  # the resumed run replaced the rows it recomputed
  a, b = _losses(run_a), _losses(run_b)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  assert a == b  # bitwise: the JSON floats are identical at every step


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, corpus_file):
  wd = str(tmp_path / "run")
  proc = subprocess.Popen(
      train_command(wd, *tiny_flags(corpus_file), "--config.total_steps=100000", "--config.log_every=1",
                    "--config.checkpoint_every=100000", "--config.eval_every=100000"),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and read_metrics(metrics)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-2000:]
  assert "SIGTERM" in stdout
  saved = _steps(wd)
  assert len(saved) == 1 and 1 <= saved[0] < 100000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file):
  wd = str(tmp_path / "run")
  out = run_train(wd, *tiny_flags(corpus_file), "--config.total_steps=30", "--config.log_every=5",
                  "--config.checkpoint_every=1", "--config.optimizer.name=adamw",
                  "--config.optimizer.schedule=constant", "--config.optimizer.learning_rate=1e30")
  assert out.returncode == 1
  message = out.stderr.strip().splitlines()[-1]
  assert message.startswith("t5jax.train: error: loss is") and " at step " in message, out.stderr[-2000:]
  bad_step = int(message.split(" at step ")[1].split(";")[0])
  assert _steps(wd) and max(_steps(wd)) == bad_step - 1


@pytest.mark.parametrize("flag,words", [
    ("--config.no_such_key=1", ["no_such_key"]),
    ("--config.total_steps=many", ["total_steps"]),
])
def test_bad_command_line_is_an_error(tmp_path, corpus_file, flag, words):
  wd = tmp_path / "run"
  out = run_train(str(wd), *tiny_flags(corpus_file), flag)
  assert out.returncode != 0
  errors = [l for l in out.stderr.splitlines() if "rror" in l]
  assert errors, out.stderr[-2000:]
  assert all(w in errors[0] for w in words), errors[0]
  assert not (wd / "checkpoints").exists() and not (wd / "config.json").exists()


@pytest.mark.parametrize("key,value,words", [
    ("data.tokenizer.path", "/nonexistent/spiece.model", ["/nonexistent/spiece.model"]),
    ("data.source.text_glob", "/nonexistent/*.txt", ["/nonexistent/*.txt"]),
    ("model.vocab_size", 64, ["vocab_size=64", "tokenizer"]),
    ("model.feed_forward_proj", "swish", ["feed_forward_proj", "swish"]),
    ("init_from", "/nonexistent/ckpt", ["/nonexistent/ckpt"]),
    ("parallel.mode", "pjit", ["parallel.mode"]),
    ("data.kind", "video_frames", ["data.kind", "video_frames"]),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(tmp_path, corpus_file, key, value, words):
  from t5jax import train
  config = tiny_config(corpus_file)
  *path, name = key.split(".")
  section = config
  for part in path:
    section = section[part]
  section[name] = value
  wd = tmp_path / "run"
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    train.run(config, str(wd))
  assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
  assert not (wd / "checkpoints").exists() and not (wd / "config.json").exists()


def test_a_workdir_refuses_another_tokenizer(tmp_path, corpus_file):
  from t5jax import train
  wd = str(tmp_path / "run")
  config = tiny_config(corpus_file)
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
  train.run(config, wd)
  saved = json.load(open(f"{wd}/config.json"))
  assert saved["data"]["source"] == f"text files {corpus_file}" and saved["tokenizer"]["file"] == "spiece.model"
  config.data.tokenizer.spm_vocab_size = 320   # a different tokenizer for the same workdir
  with pytest.raises(ValueError, match="was trained with the tokenizer .*spiece.model"):
    train.run(config, wd)

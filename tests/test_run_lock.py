"""One trainer per workdir: a second trainer is refused at once, readers are not, a killed holder never blocks
the rerun, every process of a multi-process run stops when process 0 cannot lock, and stale locks (a dead or
reused PID, no heartbeat) are taken over while live ones are not."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, host_devices_env, run_train, start_until_step, tiny_flags, train_command
from t5jax.workdir import checkpoint, run_lock


def test_a_second_trainer_is_refused_readers_are_not_and_a_killed_holder_never_blocks(tmp_path, corpus_file):
  wd = str(tmp_path / "run")
  steps = [
    *tiny_flags(corpus_file),
    "--config.total_steps=100000",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.eval_every=100000",
  ]
  first = start_until_step(train_command(wd, *steps), wd, 3)
  try:
    deadline = time.time() + 120
    while (
      not (os.path.isdir(f"{wd}/checkpoints") and checkpoint.complete_steps(f"{wd}/checkpoints"))
      and time.time() < deadline
    ):
      time.sleep(0.05)
    holder = json.load(open(f"{wd}/train.lock"))
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    started = time.monotonic()
    second = run_train(wd, *steps)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    assert (
      line.startswith(
        f"t5jax.train: error: {wd} is in use by another trainer (host {socket.gethostname()}, "
        f"pid {first.pid}, started 20"
      )
      and f"delete {wd}/train.lock and rerun" in line
    ), line
    assert time.monotonic() - started < 60  # at once: refused before building anything
    # Reading while it trains: an export and a prediction from its latest checkpoint.
    out = subprocess.run(
      [sys.executable, "-m", "t5jax.convert", "export-hf", wd, str(tmp_path / "hf")],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert out.returncode == 0 and os.path.isfile(tmp_path / "hf" / "model.safetensors"), out.stderr[-2000:]
    out = subprocess.run(
      [sys.executable, "-m", "t5jax.predict", f"--checkpoint={wd}", "--input=the model", "--max_new_tokens=3"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert first.poll() is None
  finally:
    first.kill()
    first.wait()
  # SIGKILL leaves the lock behind; the rerun sees its process is gone and takes over at once.
  assert json.load(open(f"{wd}/train.lock"))["pid"] == first.pid
  saved = checkpoint.complete_steps(f"{wd}/checkpoints")[-1]
  out = run_train(wd, *steps, f"--config.total_steps={saved + 1}")
  assert out.returncode == 0, out.stderr[-2000:]
  here = socket.gethostname()
  assert f"note: took over the lock of a trainer that is gone (host {here}, pid {first.pid}" in out.stdout
  assert f"process {first.pid} is not running" in out.stdout and f"Resuming from step {saved}" in out.stdout
  assert not os.path.exists(f"{wd}/train.lock")  # released at the end


def test_a_multi_process_run_stops_on_every_process_when_process_0_cannot_lock(tmp_path, corpus_file):
  wd, port = tmp_path / "run", free_port()
  wd.mkdir()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _write_lock(str(wd), socket.gethostname(), live.pid, run_lock._proc_start(live.pid))
    distributed = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [
      subprocess.Popen(
        train_command(str(wd), *tiny_flags(corpus_file), *distributed, f"--process_id={i}"),
        cwd=ROOT,
        env=host_devices_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    live.kill()
    live.wait()
  assert [p.returncode for p in procs] == [1, 1] and not any("Traceback" in e for e in errors), errors
  assert errors[0].strip().splitlines()[-1].startswith(f"t5jax.train: error: {wd} is in use by another trainer")
  assert errors[1].strip().splitlines()[-1] == f"t5jax.train: error: process 0 could not lock {wd} (its error says why)"
  assert sorted(os.listdir(wd)) == ["train.lock"]  # the holder's lock, and nothing written


def _write_lock(workdir, host, pid, proc_start=None, age_s=0.0):
  path = os.path.join(workdir, run_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(
      {"host": host, "pid": pid, "proc_start": proc_start, "started": time.time() - age_s, "token": "theirs"}, f
    )
  os.utime(path, (time.time() - age_s,) * 2)
  return path


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
  here = socket.gethostname()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  try:
    cases = [  # (holder, whether it is stale, words of the note or the error)
      ((here, live.pid, run_lock._proc_start(live.pid), 0), False, f"pid {live.pid}"),
      (("other-host", live.pid, None, 5), False, "host other-host"),
      (("other-host", 1, None, run_lock.STALE_S + 60), True, "no heartbeat for 18"),
      ((here, gone.pid, 12345, 0), True, f"process {gone.pid} is not running"),
      ((here, live.pid, run_lock._proc_start(live.pid) + 1, 0), True, "is not running"),  # a reused PID
    ]
    for (host, pid, start, age), stale, words in cases:
      path = _write_lock(str(tmp_path), host, pid, start, age)
      lock = run_lock.WorkdirLock(str(tmp_path))
      if stale:
        with lock:
          assert words in lock.acquire() and json.load(open(path))["token"] == lock.me["token"]
        assert not os.path.exists(path)
      else:
        with pytest.raises(ValueError, match=f"is in use by another trainer .*{words}"):
          lock.acquire()
        assert json.load(open(path))["token"] == "theirs"
        os.remove(path)
  finally:
    live.kill()
    live.wait()
  assert run_lock.running(os.getpid()) and not run_lock.running(gone.pid)
  with open(tmp_path / run_lock.LOCK_FILE, "w") as f:
    f.write('{"host": "vm", "pi')  # not a lock's JSON: locks are written whole, so nobody is writing it
  with run_lock.WorkdirLock(str(tmp_path)) as lock:
    assert "an unreadable lock file" in lock.acquire()


def test_the_heartbeat_keeps_the_lock_and_notices_a_takeover(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
  lock = run_lock.WorkdirLock(str(tmp_path))
  assert lock.acquire() is None
  path = lock.path
  os.utime(path, (time.time() - 100,) * 2)
  time.sleep(0.3)
  assert time.time() - os.stat(path).st_mtime < 5 and lock.lost is None  # refreshed
  os.remove(path)  # cleared by hand while it runs: taken back
  time.sleep(0.3)
  assert json.load(open(path))["token"] == lock.me["token"] and lock.lost is None
  _write_lock(str(tmp_path), "other-host", 7)  # taken over (this one looked hung)
  time.sleep(0.3)
  assert "another trainer took over the lock" in lock.lost and "host other-host, pid 7" in lock.lost
  lock.release()
  assert json.load(open(path))["token"] == "theirs"  # never removes a lock that is not its own

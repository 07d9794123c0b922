"""launch.sh and the sweep CLI for real: a local launch trains with the checkout's .venv, dry runs print the exact
cluster commands, tpu-pod ships the tracked files only, and a sweep runs its points, writes its tables and plot,
and skips finished points when rerun."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_flags
from t5jax.metrics import read_metrics

LAUNCH = os.path.join(ROOT, "launch.sh")


def _launch(*args, **env):
  return subprocess.run(
    [LAUNCH, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "PYTHON": sys.executable, **env},
  )


def _checkout(tmp_path, venv=None):
  """A git checkout holding launch.sh and configs/x.py (tracked) and, untracked, .venv (a link to `venv` or a
  stub) and workdirs/."""
  repo = tmp_path / "checkout"
  (repo / "configs").mkdir(parents=True)
  shutil.copy(LAUNCH, repo / "launch.sh")
  (repo / "configs" / "x.py").write_text("")
  (repo / "workdirs").mkdir()
  (repo / "workdirs" / "big.bin").write_bytes(b"0" * 1000)
  if venv:
    os.symlink(venv, repo / ".venv")
  else:
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (repo / ".venv" / "bin" / "python").chmod(0o755)
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "launch.sh", "configs/x.py"], check=True)
  return repo


def _run(script, *args, cwd=ROOT, **env):
  """`script args` with the environment of a shell where no venv is active and PYTHON is unset."""
  base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
  return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env={**base, **env})


def test_local_launch_trains_with_the_checkouts_venv_not_on_path(tmp_path, corpus_file):
  """The README's case: dependencies in .venv, not activated, and a python3 on PATH that lacks them."""
  if sys.prefix == sys.base_prefix:
    pytest.skip("the tests' python is not a virtualenv")
  repo, wd = _checkout(tmp_path, venv=sys.prefix), tmp_path / "run"
  out = _run(
    repo / "launch.sh",
    "local",
    f"{ROOT}/configs/base.py",
    f"--workdir={wd}",
    *tiny_flags(corpus_file),
    "--config.total_steps=4",
    "--config.log_every=2",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
    PATH="/usr/bin:/bin",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert [r["step"] for r in read_metrics(wd / "metrics.jsonl") if "loss" in r] == [2, 4]


def test_the_python_launch_sh_runs(tmp_path):
  """PYTHON, else the active venv's python, else the checkout's .venv, else python3; TPU workers: python3."""
  repo = _checkout(tmp_path)
  venv = tmp_path / "active"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("")
  (venv / "bin" / "python").chmod(0o755)
  launch = repo / "launch.sh"

  def python(*env_pairs, mode=("local", "c.py")):
    out = _run(launch, "--dry_run", *mode, **dict(env_pairs))
    assert out.returncode == 0, out.stderr
    return out.stdout.replace("\\ ", " ").split(" -m t5jax.train")[0].split()[-1]  # tpu-pod's is %q-quoted

  assert python(("PYTHON", "/opt/py"), ("VIRTUAL_ENV", str(venv))) == "/opt/py"
  assert python(("VIRTUAL_ENV", str(venv))) == f"{venv}/bin/python"
  assert python(("VIRTUAL_ENV", str(tmp_path / "gone"))) == f"{repo}/.venv/bin/python"
  assert python() == f"{repo}/.venv/bin/python"
  shutil.rmtree(repo / ".venv")
  assert python() == "python3"
  (repo / ".venv").mkdir()
  tpu = ("tpu-pod", "pod", "zone", "c.py")
  assert python(("VIRTUAL_ENV", str(venv)), mode=tpu) == "python3"  # a local path means nothing there
  assert python(("PYTHON", "python3.11"), mode=tpu) == "python3.11"


def test_tpu_pod_ships_only_the_tracked_files(tmp_path):
  """A real tpu-pod launch against a stand-in gcloud: the directory copied holds the tracked files only."""
  repo, bin_dir = _checkout(tmp_path), tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
    '#!/bin/sh\necho "$@" >> "$GCLOUD_LOG"\n'
    'if [ "$4" = scp ]; then (cd "$6" && find . -type f | sort) > "$SHIPPED"; fi\n'
  )
  (bin_dir / "gcloud").chmod(0o755)
  log, shipped = tmp_path / "gcloud.log", tmp_path / "shipped.txt"
  out = _run(
    repo / "launch.sh",
    "tpu-pod",
    "pod",
    "zone",
    "configs/x.py",
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    GCLOUD_LOG=str(log),
    SHIPPED=str(shipped),
  )
  assert out.returncode == 0, out.stderr
  assert shipped.read_text().split() == ["./configs/x.py", "./launch.sh"]
  scp, ssh = log.read_text().splitlines()
  assert scp.startswith("compute tpus tpu-vm scp --recurse /") and " pod:~/t5jax " in scp
  assert "T5JAX_DISTRIBUTED=auto python3 -m t5jax.train --config=configs/x.py" in ssh
  assert not os.path.exists(scp.split()[5])  # the staging copy is removed


def test_tpu_pod_dry_run_syncs_then_runs_on_every_worker():
  out = _launch(
    "--dry_run",
    "tpu-pod",
    "my-pod",
    "us-central2-b",
    "configs/base.py",
    "--workdir=gs://b/run",
    "--config.batch_size=256",
    PYTHON="python3",
  )
  assert out.returncode == 0, out.stderr
  copy, scp, ssh = out.stdout.strip().splitlines()
  stage = copy.split()[-3]
  assert copy == f"git -C {ROOT} ls-files -z | tar -C {ROOT} --null -T - -cf - | tar -C {stage} -xf -"
  assert scp.startswith(f"gcloud compute tpus tpu-vm scp --recurse {stage} my-pod:\\~/t5jax ")
  assert "--zone=us-central2-b --worker=all" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command=")
  for part in (
    "T5JAX_DISTRIBUTED=auto",
    "-m\\ t5jax.train",
    "--config=configs/base.py",
    "--workdir=gs://b/run",
    "--config.batch_size=256",
    "jax\\[tpu\\]",
  ):
    assert part in ssh, part


def test_slurm_dry_run_prints_one_task_per_gpu():
  out = _launch("--dry_run", "slurm", "2", "8", "configs/base.py", "--workdir=/shared/run", PYTHON="python3")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
    assert line in lines
  assert "srun --kill-on-bad-exit=1 python3 -m t5jax.train --config=configs/base.py --workdir=/shared/run " in lines


def test_multiprocess_dry_run_and_bad_arguments():
  out = _launch(
    "--dry_run",
    "multiprocess",
    "2",
    "configs/base.py",
    "--workdir=/tmp/x",
    PYTHON="python3",
    PORT="23456",
    DEVICES_PER_PROCESS="4",
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and all("T5JAX_COORDINATOR_ADDRESS=127.0.0.1:23456" in l for l in lines)
  assert "T5JAX_PROCESS_ID=1" in lines[1] and "--xla_force_host_platform_device_count=4" in lines[1]
  bad = _launch("slurm", "two", "8", "configs/base.py")
  assert bad.returncode == 2 and "NODES must be a positive integer, got 'two'" in bad.stderr
  assert _launch("nonsense").returncode == 2


def test_multiprocess_ends_quietly_or_reports_the_failure(tmp_path):
  """Stand-in processes: all succeed (exit 0, nothing about `wait` on stderr) or one fails (exit 1)."""
  ok, bad = tmp_path / "ok", tmp_path / "bad"
  ok.write_text("#!/bin/sh\nsleep 0.$$\n")  # staggered ends
  bad.write_text("#!/bin/sh\nexit 3\n")
  for script in (ok, bad):
    script.chmod(0o755)
  out = _launch("multiprocess", "3", "configs/base.py", PYTHON=str(ok), LOG_DIR=str(tmp_path))
  assert out.returncode == 0 and out.stderr == "", out.stderr
  out = _launch("multiprocess", "2", "configs/base.py", PYTHON=str(bad), LOG_DIR=str(tmp_path))
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
    f"launch.sh: a process failed; logs of processes 1..1 are in {tmp_path}"
  ]


def test_a_sweep_runs_writes_its_results_and_resumes(tmp_path, corpus_file):
  experiment = tmp_path / "tiny_lr.py"
  flags = [
    *tiny_flags(corpus_file),
    "--config.total_steps=6",
    "--config.log_every=3",
    "--config.eval_every=6",
    "--config.checkpoint_every=6",
  ]
  experiment.write_text(
    f"CONFIG = 'configs/base.py'\nFLAGS = {flags!r}\nGRID = {{'optimizer.learning_rate': [0.001, 0.03]}}\n"
  )
  cmd = [sys.executable, "-m", "t5jax.sweep", str(experiment), f"--workdir_root={tmp_path / 'runs'}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  results = tmp_path / "tiny_lr"
  rows = list(csv.DictReader(open(results / "results.csv")))
  assert sorted(r["optimizer.learning_rate"] for r in rows) == ["0.001", "0.03"]
  assert all(float(r["eval_loss"]) > 0 for r in rows)
  assert "| optimizer.learning_rate |" in (results / "results.md").read_text()
  assert all((results / png).read_bytes()[:4] == b"\x89PNG" for png in ("loss_curves.png", "eval_loss_curves.png"))
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count("finished before; skipped") == 2
  dry = subprocess.run([*cmd, "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert dry.stdout.count("launch.sh local") == 2 and "--config.optimizer.learning_rate=0.03" in dry.stdout
  missing = subprocess.run(
    [sys.executable, "-m", "t5jax.sweep", str(tmp_path / "nope.py")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert missing.returncode == 1 and "no experiment file" in missing.stderr and "Traceback" not in missing.stderr


def test_entry_picks_the_module_a_launch_runs_and_a_sweep_passes_it():
  """ENTRY=t5jax.distill (distillation's two steps) reaches every mode's command; anything else is refused;
  experiments/distill.py's points run through it."""
  out = _launch(
    "--dry_run", "slurm", "1", "2", "configs/distill.py", "--workdir=/shared/d", PYTHON="python3", ENTRY="t5jax.distill"
  )
  assert (
    out.returncode == 0
    and "srun --kill-on-bad-exit=1 python3 -m t5jax.distill --config=configs/distill.py" in out.stdout
  )
  out = _launch("--dry_run", "local", "configs/base.py", ENTRY="os")
  assert out.returncode == 2 and "ENTRY=os is not a t5jax module" in out.stderr
  sweep = [sys.executable, "-m", "t5jax.sweep", os.path.join(ROOT, "experiments", "distill.py"), "--dry_run"]
  dry = subprocess.run(sweep, cwd=ROOT, capture_output=True, text=True, timeout=60)
  lines = dry.stdout.splitlines()
  assert dry.returncode == 0 and len(lines) == 3 and all(line.startswith("env ENTRY=t5jax.distill ") for line in lines)

"""launch.sh and the sweep CLI for real: a local launch trains, dry runs print the exact cluster commands, and
a sweep runs its points, writes its tables and plot, and skips finished points when rerun."""

import csv
import os
import subprocess
import sys

from conftest import ROOT, tiny_flags
from t5jax.metrics import read_metrics

LAUNCH = os.path.join(ROOT, "launch.sh")


def _launch(*args, **env):
  return subprocess.run([LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHON": sys.executable, **env})


def test_local_launch_trains(tmp_path, corpus_file):
  wd = tmp_path / "run"
  out = _launch("local", "configs/base.py", f"--workdir={wd}", *tiny_flags(corpus_file), "--config.total_steps=4",
                "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint_every=4")
  assert out.returncode == 0, out.stderr[-2000:]
  assert [r["step"] for r in read_metrics(wd / "metrics.jsonl") if "loss" in r] == [2, 4]


def test_tpu_pod_dry_run_syncs_then_runs_on_every_worker():
  out = _launch("--dry_run", "tpu-pod", "my-pod", "us-central2-b", "configs/base.py", "--workdir=gs://b/run",
                "--config.batch_size=256", PYTHON="python3")
  assert out.returncode == 0, out.stderr
  scp, ssh = out.stdout.strip().splitlines()
  assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse " + ROOT)
  assert "--zone=us-central2-b --worker=all" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command=")
  for part in ("T5JAX_DISTRIBUTED=auto", "-m\\ t5jax.train", "--config=configs/base.py", "--workdir=gs://b/run",
               "--config.batch_size=256", "jax\\[tpu\\]"):
    assert part in ssh, part


def test_slurm_dry_run_prints_one_task_per_gpu():
  out = _launch("--dry_run", "slurm", "2", "8", "configs/base.py", "--workdir=/shared/run", PYTHON="python3")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
    assert line in lines
  assert "srun --kill-on-bad-exit=1 python3 -m t5jax.train --config=configs/base.py --workdir=/shared/run " in lines


def test_multiprocess_dry_run_and_bad_arguments():
  out = _launch("--dry_run", "multiprocess", "2", "configs/base.py", "--workdir=/tmp/x", PYTHON="python3",
                PORT="23456", DEVICES_PER_PROCESS="4")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and all("T5JAX_COORDINATOR_ADDRESS=127.0.0.1:23456" in l for l in lines)
  assert "T5JAX_PROCESS_ID=1" in lines[1] and "--xla_force_host_platform_device_count=4" in lines[1]
  bad = _launch("slurm", "two", "8", "configs/base.py")
  assert bad.returncode == 2 and "NODES must be a positive integer, got 'two'" in bad.stderr
  assert _launch("nonsense").returncode == 2


def test_a_sweep_runs_writes_its_results_and_resumes(tmp_path, corpus_file):
  experiment = tmp_path / "tiny_lr.py"
  flags = [*tiny_flags(corpus_file), "--config.total_steps=6", "--config.log_every=3", "--config.eval_every=6",
           "--config.checkpoint_every=6"]
  experiment.write_text(f"CONFIG = 'configs/base.py'\nFLAGS = {flags!r}\n"
                        "GRID = {'optimizer.learning_rate': [0.001, 0.03]}\n")
  cmd = [sys.executable, "-m", "t5jax.sweep", str(experiment), f"--workdir_root={tmp_path / 'runs'}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  results = tmp_path / "tiny_lr"
  rows = list(csv.DictReader(open(results / "results.csv")))
  assert sorted(r["optimizer.learning_rate"] for r in rows) == ["0.001", "0.03"]
  assert all(float(r["eval_loss"]) > 0 for r in rows)
  assert "| optimizer.learning_rate |" in (results / "results.md").read_text()
  assert (results / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count("finished before; skipped") == 2
  dry = subprocess.run([*cmd, "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert dry.stdout.count("launch.sh local") == 2 and "--config.optimizer.learning_rate=0.03" in dry.stdout
  missing = subprocess.run([sys.executable, "-m", "t5jax.sweep", str(tmp_path / "nope.py")], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
  assert missing.returncode == 1 and "no experiment file" in missing.stderr

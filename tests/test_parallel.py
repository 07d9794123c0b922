"""Scale-out for real: 8 CPU devices in every mesh layout and the pmap-style mode train the same losses, fsdp
shards the params, a checkpoint restores onto other meshes, and two jax.distributed processes started by
launch.sh train the same losses as one process with 8 devices."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, free_port, host_devices_env, tiny_config, tiny_flags, train_command
from t5jax import parallel, train
from t5jax.metrics import read_metrics

STEPS = ["--config.total_steps=5", "--config.log_every=1", "--config.eval_every=5", "--config.checkpoint_every=5"]
# One device's run goes on to step 8 (the reference for resuming on another mesh too); its steps 1..5 are the
# reference of the layouts, which train 5 steps on 8 devices.
STRAIGHT = ["--config.total_steps=8", "--config.log_every=1", "--config.eval_every=8", "--config.checkpoint_every=8"]
LAYOUTS = {
  "data=8": ["--config.mesh.data=8"],
  "fsdp=8": ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
  "data2 fsdp2 tensor2": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
  "pmap 8": ["--config.parallel.mode=pmap"],
}
# 4 heads so that tensor=4 divides them in the restore test.
HEADS = ["--config.model.num_heads=4", "--config.model.d_kv=8"]


def _flags(corpus):
  return [*tiny_flags(corpus), *HEADS]


def _curve(workdir):
  return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r]


# `t5jax.train.run` for each job of a pickle, one after another in one process of 8 devices (a process and its
# imports per layout would cost more than the training); a job may start from a copy of an earlier job's
# workdir. Each job's printout goes to WORKDIR/stdout.txt.
TRAIN_EACH = r"""
import contextlib, pickle, shutil, sys
from t5jax import train
for config, workdir, copy_of in pickle.load(open(sys.argv[1], "rb")):
  if copy_of:
    shutil.copytree(copy_of, workdir)
  with open(workdir + ".stdout.txt", "w") as f, contextlib.redirect_stdout(f):
    train.run(config, workdir)
"""


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, corpus_file):
  """Workdirs by layout: one device (8 steps), the 8-device LAYOUTS (5 steps), and "resumed": fsdp=8's run
  continued to step 8 on data=2 x tensor=4."""
  root = tmp_path_factory.mktemp("layouts")
  runs = {name: str(root / f"run{i}") for i, name in enumerate(["1 device", *LAYOUTS, "resumed"])}
  train.run(tiny_config(corpus_file, *HEADS, *STRAIGHT), runs["1 device"])  # in this process, of one device
  jobs = [(tiny_config(corpus_file, *HEADS, *STEPS, *flags), runs[name], None) for name, flags in LAYOUTS.items()]
  jobs.append(
    (
      tiny_config(corpus_file, *HEADS, *STRAIGHT, "--config.mesh.data=2", "--config.mesh.tensor=4"),
      runs["resumed"],
      runs["fsdp=8"],
    )
  )
  with open(root / "jobs.pkl", "wb") as f:
    pickle.dump(jobs, f)
  out = subprocess.run(
    [sys.executable, "-c", TRAIN_EACH, str(root / "jobs.pkl")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=host_devices_env(8),
    timeout=1500,  # five runs
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return runs


def test_every_layout_trains_the_same_losses(layout_runs):
  reference = np.array(_curve(layout_runs["1 device"]))[:5]
  assert reference.shape == (5, 3)
  for name in LAYOUTS:
    wd = layout_runs[name]
    curve = np.array(_curve(wd))
    np.testing.assert_array_equal(curve[:, 0], reference[:, 0])
    # Loss and gradient norm: a missing or doubled all-reduce shows in the norm even where the optimizer's
    # scale invariance hides it from the loss.
    np.testing.assert_allclose(curve[:, 1:], reference[:, 1:], rtol=1e-5, err_msg=name)


RESTORE = r"""
import json, sys
import jax, ml_collections, numpy as np
from t5jax import parallel, setup
from t5jax.workdir import checkpoint

workdir, meshes, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ckpts = checkpoint.Checkpoints(workdir + "/checkpoints")
step = ckpts.latest_step()
config = ml_collections.ConfigDict(ckpts.restore_meta(step)["config"])
for name, mesh_sizes, num_devices in meshes:
  mesh = parallel.make_mesh(mesh_sizes, jax.devices()[:num_devices])
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    state, _ = ckpts.restore(step, run.abstract_state)
  leaves = jax.tree_util.tree_leaves_with_path(state["params"])
  per_device = {}
  for _, x in leaves:
    for shard in x.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  np.savez(f"{out}/{name}.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
  print(json.dumps({"name": name, "total": sum(x.nbytes for _, x in leaves), "per_device": per_device}))
"""


def test_fsdp_shards_params_and_the_checkpoint_restores_onto_other_meshes(layout_runs, tmp_path):
  meshes = [
    ("fsdp8", {"data": 1, "fsdp": 8}, 8),
    ("data2 tensor4", {"data": 2, "tensor": 4}, 8),
    ("1 device", {"data": 1}, 1),
  ]
  out = subprocess.run(
    [sys.executable, "-c", RESTORE, layout_runs["fsdp=8"], json.dumps(meshes), str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=host_devices_env(8),
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  results = {}
  for line in out.stdout.strip().splitlines()[-3:]:
    sizes = json.loads(line)
    results[sizes["name"]] = (sizes, dict(np.load(tmp_path / f"{sizes['name']}.npz")))
  assert list(results) == [name for name, _, _ in meshes]
  sizes, params = results["fsdp8"]
  per_device = list(sizes["per_device"].values())
  assert len(per_device) == 8
  # Everything but the small relative-position tables is split along d_model: each device holds ~1/8.
  assert max(per_device) <= sizes["total"] / 8 * 1.05, sizes
  assert results["1 device"][0]["per_device"] == {"0": sizes["total"]}
  for name in ("data2 tensor4", "1 device"):
    other = results[name][1]
    assert other.keys() == params.keys()
    for key in params:
      np.testing.assert_array_equal(other[key], params[key], err_msg=f"{name}: {key}")


def test_a_checkpoint_resumes_training_on_another_mesh(layout_runs):
  # Steps 1-5 ran on fsdp=8; steps 6-8 resumed on data2 x tensor4 and match one device's straight 8-step run.
  resumed = layout_runs["resumed"]
  assert "Resuming from step 5" in open(resumed + ".stdout.txt").read()
  curve = np.array(_curve(resumed))
  np.testing.assert_array_equal(curve[:, 0], np.arange(1, 9))
  np.testing.assert_allclose(curve, np.array(_curve(layout_runs["1 device"])), rtol=1e-5)


def test_two_processes_train_like_one_with_eight_devices(layout_runs, tmp_path, corpus_file):
  wd = str(tmp_path / "multi")
  env = host_devices_env(PORT=str(free_port()), DEVICES_PER_PROCESS="4", LOG_DIR=str(tmp_path), PYTHON=sys.executable)
  out = subprocess.run(
    [
      f"{ROOT}/launch.sh",
      "multiprocess",
      "2",
      f"{ROOT}/configs/base.py",
      f"--workdir={wd}",
      *_flags(corpus_file),
      *STEPS,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  log1 = (tmp_path / "t5jax_process_1.log").read_text()
  assert out.returncode == 0, out.stderr[-2000:] + log1[-2000:]
  assert "T5 with" in out.stdout and "T5 with" not in log1  # only process 0 reports
  np.testing.assert_allclose(np.array(_curve(wd)), np.array(_curve(layout_runs["data=8"])), rtol=1e-5)
  assert os.listdir(f"{wd}/checkpoints") == ["5"]


def test_when_a_process_dies_the_other_exits_instead_of_hanging(tmp_path, corpus_file):
  wd, port = str(tmp_path / "run"), free_port()
  procs = []
  for i in range(2):
    cmd = train_command(
      wd,
      *tiny_flags(corpus_file),
      "--config.total_steps=100000",
      "--config.log_every=1",
      "--config.eval_every=100000",
      "--config.checkpoint_every=100000",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      "--distributed_heartbeat=10",
    )
    procs.append(
      subprocess.Popen(
        cmd, cwd=ROOT, env=host_devices_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
      )
    )
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 3):
    assert procs[0].poll() is None, procs[0].stderr.read()[-2000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  try:
    procs[0].wait(timeout=90)
  finally:
    procs[0].kill()
  assert procs[0].returncode != 0
  # Its 10 s heartbeat: measured here 7 s from the kill to the exit, 22 s with the default of 30 s.
  assert time.time() - killed < 18


@pytest.mark.parametrize(
  "mesh,words",
  [
    ({"data": 3}, "3 devices but there are 8"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"model": 2}, "unknown mesh axis 'model'"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
  ],
)
def test_bad_meshes_are_named(mesh, words):
  with pytest.raises(ValueError, match=words):
    parallel.mesh_shape(mesh, 8)


def test_mesh_shape_fills_the_free_axis():
  assert parallel.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}


def test_a_batch_that_does_not_split_over_the_mesh_is_named():
  with pytest.raises(ValueError, match="config.batch_size=12 is not divisible by data x fsdp = 8"):
    parallel.check_batch_size(parallel.mesh_shape({"data": 8}, 8), 12)


def test_an_unreachable_coordinator_is_a_one_line_error(tmp_path, corpus_file):
  flags = ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=1", "--distributed_timeout=5"]
  words = "could not join the run at coordinator 127.0.0.1:1"
  out = subprocess.run(
    train_command(str(tmp_path / "run"), *tiny_flags(corpus_file), *flags),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=host_devices_env(),
    timeout=300,
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("t5jax.train: error:")]
  assert errors and words in errors[0], out.stderr[-2000:]


def test_plan_compiles_for_fake_devices_without_running():
  def plan(*flags):
    return subprocess.run(
      [sys.executable, "-m", "t5jax.plan", f"--config={ROOT}/configs/base.py", *flags],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=host_devices_env(),
      timeout=300,
    )

  sharded = plan("--devices=4", "--mesh=data=1,fsdp=4")
  assert sharded.returncode == 0, sharded.stderr[-2000:]
  whole = plan("--devices=1", "--mesh=data=1")
  assert whole.returncode == 0, whole.stderr[-2000:]
  first = lambda out: out.stdout.splitlines()[-3]  # noqa: E731
  assert "'fsdp': 4" in first(sharded) and "2.6M params" in first(sharded)

  def figures(out):
    per_device, per_step = out.stdout.strip().splitlines()[-2:]
    value, unit = per_device.split("params ")[1].split(" |")[0].split()
    params = float(value) * {"MiB": 2**20, "GiB": 2**30}[unit]
    flops = float(per_step.split("per step: ")[1].split(" FLOPs")[0])
    return params, flops

  (p4, f4), (p1, f1) = figures(sharded), figures(whole)
  assert p4 == pytest.approx(p1 / 4, rel=0.02)  # fsdp=4: a quarter of the params each
  assert f4 == pytest.approx(f1 / 4, rel=0.1)  # the work splits over the devices
  bad = plan("--devices=4", "--mesh=data=3")
  assert bad.returncode == 1 and "has 3 devices but there are 4" in bad.stderr and "Traceback" not in bad.stderr

"""`plan --topology`: the train step compiled by the TPU compiler (libtpu) for a TPU topology on this CPU host,
its memory against the chip's HBM, FLOPs, collectives and roofline; `--search`; the GPU analytic plan; and
libtpu's presence leaving ordinary CPU runs alone."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from configs import base
from t5jax.planning import roofline, search, topology
from t5jax.model import T5Config, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e '.[tpu-plan]')"
)
# A tiny T5.1.1 with scanned layers: the TPU compile takes seconds, not minutes.
TINY = {"model.scan_layers": True, "model.dtype": "bfloat16", "batch_size": 8, "data.inputs_length": 32}


def _plan(*flags, timeout=300, cache=""):
  command = [
    sys.executable,
    "-m",
    "t5jax.plan",
    f"--config={ROOT}/configs/base.py:t5.1.1-tiny",
    *[f"--config.{k}={v}" for k, v in TINY.items()],
    f"--plan_cache={cache}",
    *flags,
  ]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tiny_config():
  config = base.get_config("t5.1.1-tiny")
  for key, value in TINY.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


FSDP2 = ("--topology=v5e:2x2", "--mesh=data=2,fsdp=2")


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("plan_cache")


def _cli_plan(tmp_path_factory, plan_cache, *flags):
  """The CLI's plan of the tiny model: its table and its JSON."""
  path = tmp_path_factory.mktemp("plan") / "plan.json"
  out = _plan(*flags, f"--json={path}", cache=plan_cache)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(path) as f:
    return out.stdout, json.load(f)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, plan_cache):
  """The tiny model on v5e:2x2 as data 2 x fsdp 2."""
  return _cli_plan(tmp_path_factory, plan_cache, *FSDP2)


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory, plan_cache):
  return _cli_plan(tmp_path_factory, plan_cache, "--topology=v5e:2x2", "--mesh=fsdp=4")[1]


@needs_libtpu
def test_tiny_model_compiles_for_v5e_2x2_and_prints_one_table(fsdp2):
  stdout, result = fsdp2
  assert "v5e:2x2: 4 x TPU v5e" in stdout and "fits" in stdout and "roofline step" in stdout
  assert "estimates, not measurements" in stdout
  assert result["fits"] is True and 0 < result["total_bytes"] < result["chip"]["hbm_bytes"]
  parts = ("param_bytes", "opt_bytes", "temp_bytes", "code_bytes", "other_bytes")
  assert result["total_bytes"] == sum(result[k] for k in parts) and min(result[k] for k in parts) >= 0
  # fsdp shards the weights, so the step gathers them, and data parallelism all-reduces something.
  assert result["collectives"]["all-gather"]["bytes"] > 0
  r = result["roofline"]
  assert r["serial_s"] == pytest.approx(r["compute_s"] + r["comm_s"])
  assert r["overlapped_s"] == pytest.approx(max(r["compute_s"], r["comm_s"]))
  assert 0 < r["overlapped_mfu"] <= 1


@needs_libtpu
def test_a_program_planned_before_is_not_compiled_again(fsdp2, fsdp4, plan_cache, tmp_path_factory):
  # Two programs (two meshes) compiled, two entries kept.
  assert fsdp2[1]["cached"] is fsdp4["cached"] is False and len(os.listdir(plan_cache)) == 2
  stdout, again = _cli_plan(tmp_path_factory, plan_cache, *FSDP2)
  assert again["cached"] is True and "figures kept from then" in stdout
  keys = ("total_bytes", "temp_bytes", "code_bytes", "collectives", "roofline", "flops_per_device")
  assert {k: again[k] for k in keys} == {k: fsdp2[1][k] for k in keys}


@needs_libtpu
def test_param_bytes_follow_the_shards(fsdp2, fsdp4):
  params = count_params(T5Config.from_dict(_tiny_config().model.to_dict()))
  assert fsdp4["param_bytes"] == pytest.approx(params * 4 / 4, rel=0.05)  # float32 params over 4 shards
  assert fsdp2[1]["param_bytes"] == pytest.approx(2 * fsdp4["param_bytes"], rel=0.05)
  # The FLOPs of a step do not depend on how it is sharded.
  assert fsdp4["flops_per_device"] == pytest.approx(fsdp2[1]["flops_per_device"], rel=0.01)


@needs_libtpu
def test_an_impossible_mesh_is_a_one_line_error():
  out = _plan("--topology=v5e:2x2", "--mesh=data=3")
  errors = [line for line in out.stderr.splitlines() if line.startswith("t5jax.plan: error:")]
  assert out.returncode == 1 and len(errors) == 1 and "Traceback" not in out.stderr
  assert "v5e:2x2 (4 devices)" in errors[0] and "has 3 devices but there are 4" in errors[0]


def test_without_libtpu_the_plan_says_how_to_install_it(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(ValueError, match=r"pip install -e '.\[tpu-plan\]'"):
    topology.topology_devices("v5e:2x2")


def test_flops_count_every_layer_and_microbatch():
  """XLA counts a loop body once, so a scanned or accumulated step's compiled FLOPs cover one layer or one
  microbatch. The plan's come from shallow unrolled twins extrapolated in depth: they must equal the FLOPs of
  the whole step traced unrolled, whatever the scan and microbatch settings."""
  config = _tiny_config()
  config.model.update(num_encoder_layers=3, num_decoder_layers=4)
  config.grad_accum_steps = 2
  step, model = topology.twin_flops(config)
  assert step == model == pytest.approx(topology._lowered_flops(config, "none", 3, 4), rel=1e-6)


def test_a_compile_out_of_hbm_is_a_plan_that_does_not_fit():
  spec = roofline.CHIPS["v5e"]
  late = topology._compile_failure(
    ValueError(
      "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
      "Used 17.5G of 15.75G hbm. Exceeded hbm capacity by 1.7G."
    ),
    spec,
  )
  assert late["fits"] is False and late["total_bytes"] == 17.5 * 2**30
  early = topology._compile_failure(
    ValueError(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.24G) "
      "exceeds available HBM (15.75G)."
    ),
    spec,
  )
  assert early["fits"] is False and early["temp_bytes"] == 16.24 * 2**30 and math.isnan(early["total_bytes"])
  assert topology._compile_failure(ValueError("INTERNAL: no"), spec) == {"fits": None, "error": "INTERNAL: no"}


def test_collectives_inside_loops_count_once_per_trip():
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ag = f32[16,8]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %n = s32[] constant(24)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ar = bf16[1024]{0} all-reduce(%a), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""
  found = {c["kind"]: c for c in roofline.collectives(hlo, 4)}
  assert found["all-gather"]["runs"] == 24 and found["all-gather"]["bytes"] == 16 * 8 * 4
  assert found["all-gather"]["group"] == [0, 1]
  assert found["all-reduce"]["runs"] == 1 and found["all-reduce"]["group"] == [0, 1, 2, 3]
  spec = roofline.CHIPS["v5e"]

  class Device:
    def __init__(self, i):
      self.coords = (i % 2, i // 2, 0)

  seconds = roofline.comm_seconds(list(found.values()), [Device(i) for i in range(4)], spec)
  # The gather runs along one torus dimension (2 links); the all-reduce spans two (4 links), ring-style.
  expected = 24 * 0.5 * 512 / (spec.ici_bw / 4) + 2 * 0.75 * 2048 / (2 * spec.ici_bw / 4)
  assert seconds == pytest.approx(expected)


def test_gpu_plan_is_analytic_and_says_so():
  out = _plan("--platform=gpu", "--topology=h100:8", "--mesh=fsdp=8", timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "analytic" in out.stdout and "8 x NVIDIA H100 SXM" in out.stdout and "fits" in out.stdout


def test_search_grid_and_its_time_limit(tmp_path):
  config = _tiny_config()
  meshes = search.auto_meshes(4, config)
  assert {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1} in meshes
  assert all(m["data"] * m["fsdp"] * m["tensor"] == 4 for m in meshes)
  # One point that cannot compile in a second is reported as such, not waited for.
  out = _plan(
    "--topology=v5e:2x2",
    "--search",
    "--search_meshes=data=2,fsdp=2",
    "--search_remat=full",
    "--search_timeout=1",
    f"--json={tmp_path / 'search.json'}",
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "no compile within 1 s" in out.stdout and "--config.model.remat_policy=full" in out.stdout
  assert json.load(open(tmp_path / "search.json"))[0]["fits"] is None


def test_search_ranks_what_fits_by_step_time_then_by_the_serial_bound(capsys):
  def point(mesh, seconds, serial, fits=True):
    return {
      "mesh": mesh,
      "overrides": ["--config.model.remat_policy=full"],
      "fits": fits,
      "total_bytes": 2**30,
      "roofline": {"overlapped_s": seconds, "serial_s": serial, "overlapped_mfu": 0.5},
    }

  search.report(
    [
      point("data=4", 2.0, 3.0),
      point("fsdp=4", 1.0, 1.9),
      point("data=2,fsdp=2", 1.0, 1.5),
      point("tensor=4", 0.5, 0.6, fits=False),
    ]
  )
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[:2] for line in lines[:3]] == [["1.", "data=2,fsdp=2"], ["2.", "fsdp=4"], ["3.", "data=4"]]
  assert "tensor=4" in lines[3] and "does not fit" in lines[3]


@needs_libtpu
def test_libtpu_leaves_cpu_runs_alone():
  """With libtpu installed and no TPU attached, JAX would start the TPU runtime, print a page of warnings
  and take ~0.3 s; t5jax keeps the platform on the CPU unless JAX_PLATFORMS says otherwise."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import t5jax, jax, os; print(jax.devices()[0].platform, os.environ['JAX_PLATFORMS'])"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  assert out.stdout.split() == ["cpu", "cpu"] and "TPU" not in out.stderr, out.stderr[-2000:]

"""The one run setup (t5jax/setup.py): every config builds, plans and compiles through it, with nothing
concrete created while it builds (so it can plan for devices this machine does not have)."""

import glob
import importlib
import os

import jax
import pytest

from t5jax import parallel, plan, setup
from t5jax.data.video_dataset import frame_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")
)


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_is_covered():
  assert {"base", "span_corruption", "multitask"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_compiles_every_config_with_the_pipelines_batch(name):
  config = _config(name)
  result = plan.plan(config, {"data": 1})
  assert result["flops_per_device"] > 0 and result["temp_bytes"] > 0
  batch = result["batch"]
  if config.data.kind == "video":
    assert batch["frames"] == (config.batch_size,) + frame_shape(config.data.video)
  else:
    assert batch["encoder_input_tokens"] == (config.batch_size, config.data.inputs_length)
  packed = config.data.kind == "tasks" and config.data.packing.enabled
  assert ("encoder_segment_ids" in batch) == packed


@pytest.mark.parametrize("name,mode", [("base", "jit"), ("multitask", "jit"), ("base", "pmap")])
def test_build_creates_no_concrete_array(name, mode):
  config = _config(name)
  config.parallel.mode = mode
  mesh = parallel.make_mesh(config.mesh)
  # A host-to-device transfer is what creating any concrete array (a PRNG key, an optimizer zero) costs.
  with jax.transfer_guard("disallow"), parallel.use_mesh(mesh, mode):
    run = setup.build(config, mesh)
    run.lower_train_step()
  assert set(run.abstract_state) == {"params", "opt_state", "step", "rng"}


def test_unknown_mode_is_named():
  config = _config("base")
  config.parallel.mode = "pjit"
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh), pytest.raises(ValueError, match="config.parallel.mode='pjit' is unknown"):
    setup.build(config, mesh)

"""MoE and checkpoints, through real runs: sparse upcycling of a dense run (`init_from`), a text T5 into the
video model, the expert-count errors, and resume after SIGKILL still bitwise exact with experts."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import t5jax
from conftest import MOE_FLAGS, NO_LOADER_WORKERS, TINY_RUN_STEPS, assert_resumes_exactly, run_train, tiny_flags
from t5jax.workdir import checkpoint
from t5jax.model import init_params
from t5jax.model.config import MoeConfig, VideoConfig


def flat_params(path):
  params, _ = checkpoint.load_params(os.path.join(path, "checkpoints"))
  return traverse_util.flatten_dict(params)


def test_upcycling_copies_the_dense_ffn_into_every_expert(tiny_run, corpus_file, tmp_path):
  """An MoE run with init_from=DENSE trains from the dense weights: each expert of a sparse layer is its layer's
  dense FFN, routers fresh, the rest loaded; then the MoE checkpoint is refused by a dense config."""
  wd = str(tmp_path / "moe")
  out = run_train(
    wd,
    *tiny_flags(corpus_file),
    *TINY_RUN_STEPS,
    *MOE_FLAGS,
    "--config.model.scan_layers=true",
    f"--config.init_from={tiny_run}",
  )
  assert out.returncode == 0 and "Initialized the weights from" in out.stdout, out.stderr[-2000:]

  dense, dense_config = t5jax.load_checkpoint(tiny_run)
  moe_config = dataclasses.replace(dense_config, moe=MoeConfig(num_experts=4, every_encoder=2, every_decoder=1))
  upcycled = traverse_util.flatten_dict(t5jax.load_params_for(tiny_run, moe_config))
  dense = traverse_util.flatten_dict(dense)
  fresh = traverse_util.flatten_dict(init_params(moe_config, jax.random.key(0)))  # load_params_for's default
  sparse = [("encoder", "layers_1"), ("decoder", "layers_0"), ("decoder", "layers_1")]  # every 2nd / every one
  for key, value in upcycled.items():
    if key[:2] in sparse and key[2] == "mlp":
      if key[3] == "router":
        np.testing.assert_array_equal(value, fresh[key])
      else:
        assert value.shape == (4,) + dense[key[:3] + (key[4], "kernel")].shape
        for e in range(4):
          np.testing.assert_array_equal(value[e], dense[key[:3] + (key[4], "kernel")])
    else:
      np.testing.assert_array_equal(value, dense[key])
  assert ("encoder", "layers_0", "mlp", "wi_0", "kernel") in upcycled  # dense layers stay dense

  with pytest.raises(
    ValueError,
    match=r"mixture-of-experts checkpoint \(num_experts=4\) cannot initialize a "
    r"dense model \(config.model has no moe group\)",
  ):
    t5jax.load_params_for(wd, dense_config)
  with pytest.raises(ValueError, match=r"the checkpoint has num_experts=4 but config.model.moe.num_experts=8"):
    t5jax.load_params_for(wd, dataclasses.replace(moe_config, moe=dataclasses.replace(moe_config.moe, num_experts=8)))
  # Upcycling still checks shapes: a dense FFN of another width is named.
  with pytest.raises(ValueError, match=r"param decoder/layers_0/mlp/experts/wi_0 has shape \(4, 32, 64\) .*upcycled"):
    t5jax.load_params_for(tiny_run, dataclasses.replace(moe_config, d_ff=48))


def _video_config(text_config):
  return dataclasses.replace(text_config, video=VideoConfig(tubelet=(2, 8, 8), frames=4, size=(16, 16))).validate()


def test_a_text_checkpoint_initializes_the_video_model_but_for_its_front_end(tiny_run, tmp_path):
  text, text_config = t5jax.load_checkpoint(tiny_run)
  video_config = _video_config(text_config)
  fresh = init_params(video_config, jax.random.key(3))
  loaded = traverse_util.flatten_dict(t5jax.load_params_for(tiny_run, video_config, fresh=fresh))
  fresh, text = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(text)
  assert {k for k in loaded if k not in text} == {k for k in fresh if k[0] == "video_embed"} != set()
  for key, value in loaded.items():
    np.testing.assert_array_equal(value, fresh[key] if key[0] == "video_embed" else text[key])
  # Any other difference is still an error; and a video checkpoint does not load into the text model.
  with pytest.raises(
    ValueError,
    match=r"param decoder/layers_0/mlp/wi_0/kernel has shape \(32, 64\) but "
    r"config.model implies \(32, 48\)",
  ):
    t5jax.load_params_for(tiny_run, dataclasses.replace(video_config, d_ff=48))
  ckpts = checkpoint.Checkpoints(str(tmp_path / "video" / "checkpoints"), async_save=False)
  ckpts.save(
    0,
    {"params": init_params(video_config, jax.random.key(0))},
    {"data_position": 0, "config": {"model": video_config.to_dict()}},
  )
  ckpts.wait()
  ckpts.close()
  with pytest.raises(ValueError, match=r"param video_embed/.* has shape \(.*\) but config.model implies None"):
    t5jax.load_params_for(str(tmp_path / "video"), text_config)


def test_moe_resume_after_sigkill_is_bitwise_exact(tmp_path, corpus_file):
  """benchmarks/kill_resume.py's run with experts (and router jitter, so the resumed rng matters): killed
  mid-run, resumed, it logs the same losses and ends with the same params (routers included) bit for bit."""
  from benchmarks import kill_resume

  reference = assert_resumes_exactly(tmp_path, corpus_file, 8, 4, *kill_resume.MOE, NO_LOADER_WORKERS)
  assert any("router" in "/".join(k) for k in traverse_util.flatten_dict(reference[1]))

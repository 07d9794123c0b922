"""Workdirs written before T5Config had its moe and video groups (tests/data/old_workdirs/README.md: trained by
commit 675b8b0, with flat num_experts / moe_* / video_* keys and a data.video group in config.json) read as
today's, resume from today's config files, and export to Hugging Face as before."""

import os
import shutil

import jax
import numpy as np
import pytest

import t5jax
from conftest import ROOT, config_from
from t5jax import train
from t5jax.hf import t5 as hf
from t5jax.metrics import read_metrics
from t5jax.model.config import MoeConfig
from t5jax.workdir import checkpoint, record

OLD = os.path.join(ROOT, "tests", "data", "old_workdirs")
FLAGS = [  # the flags they were trained with (README.md there), but total_steps
  "--config.data.source.text_glob=tests/data/old_workdirs/corpus.txt",
  "--config.data.tokenizer.spm_vocab_size=300",
  "--config.data.inputs_length=32",
  "--config.model.vocab_size=512",
  "--config.model.d_model=16",
  "--config.model.num_heads=2",
  "--config.model.d_kv=8",
  "--config.model.d_ff=32",
  "--config.model.num_encoder_layers=2",
  "--config.model.num_decoder_layers=2",
  "--config.batch_size=4",
  "--config.eval_steps=1",
  "--config.eval_every=2",
  "--config.checkpoint_every=2",
  "--config.log_every=1",
  "--config.async_checkpoints=false",
]
# Each run: its config file and flags today (the moe group's keys in place of the flat moe_* ones).
RUNS = {
  "text": [f"--config={ROOT}/configs/base.py"],
  "moe": [
    f"--config={ROOT}/configs/moe.py:4",
    "--config.model.moe.every_encoder=2",
    "--config.model.moe.every_decoder=1",
    "--config.model.feed_forward_proj=relu",
  ],
}
MOE = MoeConfig(num_experts=4, every_encoder=2, every_decoder=1, group_size=256)


def test_their_records_and_checkpoints_read_in_todays_keys():
  for name, moe in (("text", None), ("moe", MOE)):
    config = record.read_record(os.path.join(OLD, name))["config"]
    flat = [k for k in config["model"] if k == "num_experts" or k.startswith(("moe_", "video_"))]
    assert flat == [] and "video" not in config["model"] and "video" not in config["data"], name
    assert ("moe" in config["model"]) == (moe is not None), name
    _, model_config = t5jax.load_checkpoint(os.path.join(OLD, name))
    assert model_config.moe == moe and model_config.video is None, name


@pytest.mark.parametrize("name", sorted(RUNS))
def test_they_resume_from_todays_config_files(name, tmp_path, monkeypatch):
  """A rerun with today's config file and the same flags continues the old run: no setting is called changed,
  and the old checkpoint restores into today's state."""
  monkeypatch.chdir(ROOT)  # the runs read their corpus by a path relative to the checkout
  workdir = str(tmp_path / name)
  shutil.copytree(os.path.join(OLD, name), workdir)
  config = config_from(*RUNS[name], *FLAGS, "--config.total_steps=4")
  train.run(config, workdir)
  assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
  rows = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert rows == [1, 2, 3, 4]  # the old run's two rows, then this one's


@pytest.mark.parametrize("name", sorted(RUNS))
def test_they_export_to_hugging_face_and_back(name, tmp_path):
  params, model_config = t5jax.load_checkpoint(os.path.join(OLD, name))
  hf.save_hf(params, model_config, str(tmp_path))
  back, back_config = hf.load_hf(str(tmp_path))
  assert back_config.num_experts == model_config.num_experts
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(params))

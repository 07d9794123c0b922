"""The video data kind and the video T5: batches match their spec, are a pure function of (seed, step, shard),
resume exactly, the model trains on them (augmenting only in training), and `t5jax.train` then
`t5jax.evaluate` run end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import video as video_config
from t5jax import evaluate, workdir as workdir_lib
from t5jax.data import pipeline, specs, video_dataset
from t5jax.model import T5Config, init_params
from t5jax.model.video import VideoT5
from t5jax.video_augment import AugmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  c = video_config.get_config()
  c.batch_size = 4
  c.data.video.synthetic.count = 24
  c.data.video.eval_fraction = 0.25
  c.data.video.index_workers = 1
  c.model.update(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
  return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("video_cache"))


@pytest.fixture(scope="module")
def data(cache_dir):
  return pipeline.from_config(tiny_config(), cache_dir)


def test_batches_match_the_spec_and_captions_round_trip(data):
  spec = specs.batch_spec(tiny_config())
  for batch in (data.train[0], data.eval[0]):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
  batch = data.eval[0]
  captions = [data.tokenizer.decode(t) for t in batch["decoder_target_tokens"]]
  assert captions == [c for _, c in data.eval_examples[:4]]
  assert (batch["decoder_input_tokens"][:, 1:] == batch["decoder_target_tokens"][:, :-1]).all()
  assert data.skipped == {"unreadable_videos": 0}
  held_out = {p for p, _ in data.eval_examples}
  assert held_out == {p for p, _ in data.eval_examples if video_dataset.is_held_out(p, 0.25)}


def test_a_batch_is_a_function_of_seed_and_step_and_survives_a_rebuild(data, cache_dir):
  first = data.train[3]
  rebuilt = pipeline.from_config(tiny_config(), cache_dir)   # a resumed run builds its data afresh
  for key in first:
    np.testing.assert_array_equal(first[key], rebuilt.train[3][key])
  assert not np.array_equal(first["frames"], data.train[4]["frames"])
  other = tiny_config()
  other.seed = 1
  assert not np.array_equal(first["frames"], pipeline.from_config(other, cache_dir).train[3]["frames"])
  # Two hosts split global batch 3 between them.
  halves = [pipeline.from_config(tiny_config(), cache_dir, i, 2).train[3] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["frames"] for h in halves]), first["frames"])


def _video_model_config(**overrides):
  c = tiny_config().model.to_dict()
  c.update(overrides)
  return T5Config.from_dict(c).validate()


def test_video_t5_keeps_the_text_param_names_and_augments_only_with_an_rng():
  cfg = _video_model_config()
  params = init_params(cfg, jax.random.PRNGKey(0))
  text = init_params(T5Config.from_dict({**cfg.to_dict(), "video_tubelet": ()}), jax.random.PRNGKey(0))
  assert set(params) - set(text) == {"video_embed"}
  assert jax.tree.map(jnp.shape, {k: params[k] for k in text}) == jax.tree.map(jnp.shape, text)
  assert set(params["video_embed"]) == {"patch", "pos_time", "pos_height", "pos_width"}
  model = VideoT5(cfg, augment=AugmentConfig(size=cfg.video_size, flip=False))
  shape = (2, cfg.video_frames, *cfg.video_size, 3)
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, shape), jnp.uint8)
  ids = jnp.ones((2, 5), jnp.int32)
  plain = model.apply({"params": params}, frames, ids)
  assert plain.shape == (2, 5, cfg.vocab_size)
  draw = lambda seed: model.apply({"params": params}, frames, ids, rngs={"dropout": jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.allclose(draw(1), draw(2)) and not np.allclose(draw(1), plain)
  with pytest.raises(ValueError, match="video_frames=7"):
    _video_model_config(video_frames=7)


def test_train_runs_end_to_end(tmp_path):
  wd = str(tmp_path / "run")
  flags = ["--config.total_steps=4", "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint_every=4",
           "--config.batch_size=4", "--config.eval_steps=1", "--config.data.video.synthetic.count=24",
           "--config.data.video.eval_fraction=0.25", "--config.model.d_model=32", "--config.model.d_ff=64",
           "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1"]
  out = subprocess.run([sys.executable, "-m", "t5jax.train", f"--config={ROOT}/configs/video.py",
                        f"--workdir={wd}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in open(f"{wd}/metrics.jsonl")]
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["loss"]) for r in train)
  assert train[-1]["unreadable_videos_skipped"] == 0
  assert any("eval_loss" in r for r in rows)
  # `t5jax.evaluate` captions every held-out video of the run from its checkpoint.
  results = evaluate.run(ml_collections.ConfigDict(workdir_lib.read_record(wd)["config"]), wd)
  assert results["captions"]["num_examples"] == len(pipeline.from_config(tiny_config(), f"{wd}/cache").eval_examples)
  assert 0.0 <= results["captions"]["exact_match"] <= 100.0

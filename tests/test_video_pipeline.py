"""The video data kind and the video T5: batches match their spec, are a pure function of (seed, step, shard),
resume exactly, the model trains on them (augmenting only in training, masking padded frames, reading a text
prefix), and `t5jax.train`, `t5jax.evaluate` and `t5jax.predict --video` run end to end."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import t5jax
from conftest import predict_in_process
from configs import video as video_config
from t5jax import evaluate, inference
from t5jax.workdir import record as workdir_lib
from t5jax import seams
from t5jax.data import pipeline, video_dataset
from t5jax.model import T5Config, init_params
from t5jax.model.video import INPUTS, VideoT5, greedy_captions
from t5jax.predict import PredictError
from t5jax.model.video_augment import AugmentConfig

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
  spec = seams.batch_spec(tiny_config())
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
  rebuilt = pipeline.from_config(tiny_config(), cache_dir)  # a resumed run builds its data afresh
  for key in first:
    np.testing.assert_array_equal(first[key], rebuilt.train[3][key])
  assert not np.array_equal(first["frames"], data.train[4]["frames"])
  other = tiny_config()
  other.seed = 1
  assert not np.array_equal(first["frames"], pipeline.from_config(other, cache_dir).train[3]["frames"])
  # Two hosts split global batch 3 between them.
  halves = [pipeline.from_config(tiny_config(), cache_dir, i, 2).train[3] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["frames"] for h in halves]), first["frames"])


def _video_model_config(**video):
  """The tiny config's model, with `video` fields changed in its video group."""
  c = tiny_config().model.to_dict()
  c["video"].update(video)
  return T5Config.from_dict(c).validate()


def test_video_t5_keeps_the_text_param_names_and_augments_only_with_an_rng():
  cfg = _video_model_config()
  params = init_params(cfg, jax.random.PRNGKey(0))
  text = init_params(dataclasses.replace(cfg, video=None), jax.random.PRNGKey(0))
  assert set(params) - set(text) == {"video_embed"}
  assert jax.tree.map(jnp.shape, {k: params[k] for k in text}) == jax.tree.map(jnp.shape, text)
  assert set(params["video_embed"]) == {"patch", "pos_time", "pos_height", "pos_width"}
  model = VideoT5(cfg, augment=AugmentConfig(size=cfg.video.size, flip=False))
  shape = (2, cfg.video.frames, *cfg.video.size, 3)
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, shape), jnp.uint8)
  ids = jnp.ones((2, 5), jnp.int32)
  plain = model.apply({"params": params}, frames, ids)
  assert plain.shape == (2, 5, cfg.vocab_size)
  draw = lambda seed: model.apply({"params": params}, frames, ids, rngs={"dropout": jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.allclose(draw(1), draw(2)) and not np.allclose(draw(1), plain)
  with pytest.raises(ValueError, match="video.frames=7"):
    _video_model_config(frames=7)


def test_padded_frames_are_masked_out_and_their_content_never_counts():
  cfg = _video_model_config()
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = VideoT5(cfg, augment=AugmentConfig(size=cfg.video.size, flip=False))
  rng = np.random.default_rng(0)
  shape = (2, cfg.video.frames, *cfg.video.size, 3)
  frames = rng.integers(0, 255, shape).astype(np.uint8)
  other = frames.copy()
  other[:, 5:] = rng.integers(0, 255, other[:, 5:].shape)  # new content in the padded frames only
  mask = np.arange(cfg.video.frames) < 5  # 5 real frames of 8: tubelets {0,1} .. {6,7}
  mask = np.stack([mask, mask])
  ids = jnp.ones((2, 5), jnp.int32)
  encode = lambda f, m: model.apply({"params": params}, f, frame_mask=m, method=VideoT5.encode_video)
  (_, token_mask) = encode(frames, mask)
  per_tubelet = np.asarray(token_mask).reshape(2, 4, -1)  # 4 tubelets in time, time-major tokens
  assert per_tubelet[:, :3].all() and not per_tubelet[:, 3].any()  # {4,5} has a real frame, {6,7} none
  for rngs in ({}, {"dropout": jax.random.PRNGKey(3)}):  # eval, and training with its augmentation
    run = jax.jit(lambda f, m, rngs=rngs: model.apply({"params": params}, f, ids, frame_mask=m, rngs=rngs))
    np.testing.assert_allclose(run(frames, mask), run(other, mask), atol=1e-5, rtol=0)
    real = np.ones_like(mask)
    assert not np.allclose(run(frames, real), run(other, real), atol=1e-3)  # unmasked, the content counts


def test_a_text_prefix_is_embedded_before_the_video_tokens():
  cfg = _video_model_config()
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = VideoT5(cfg)
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, cfg.video.frames, *cfg.video.size, 3)), jnp.uint8)
  prefix = jnp.asarray([[5, 6, 7, 0], [5, 6, 7, 0]], jnp.int32)
  encoded, mask = model.apply({"params": params}, frames, prefix_tokens=prefix, method=VideoT5.encode_video)
  plain, plain_mask = model.apply({"params": params}, frames, method=VideoT5.encode_video)
  assert encoded.shape[1] == plain.shape[1] + 4
  np.testing.assert_array_equal(mask[:, :4], [[True, True, True, False]] * 2)
  assert np.asarray(mask[:, 4:]).all() and np.asarray(plain_mask).all()
  assert not np.allclose(encoded[:, 4:], plain, atol=1e-3)  # the video tokens attend to the prefix
  # The prefix is embedded with the shared token table: the encodings follow its rows 5..7.
  moved = jax.tree.map(lambda x: x, params)
  moved["shared_embedding"]["embedding"] = params["shared_embedding"]["embedding"].at[6].add(1.0)
  encode = lambda p, **kw: model.apply({"params": p}, frames, method=VideoT5.encode_video, **kw)[0]
  assert not np.allclose(encode(moved, prefix_tokens=prefix), encoded, atol=1e-3)
  np.testing.assert_array_equal(encode(moved), plain)


def test_prefix_and_frame_mask_come_with_every_batch(cache_dir):
  c = tiny_config()
  c.data.video.update(prefix="caption: ", short="pad", stride=3.0)  # 8 frames 3 apart: 22 > 16 source frames
  data = pipeline.from_config(c, cache_dir)
  spec = seams.batch_spec(c)
  for batch in (data.train[0], data.eval[0]):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    np.testing.assert_array_equal(batch["frame_mask"], np.tile(np.arange(8) * 3 < 16, (4, 1)))
    assert {data.tokenizer.decode(row) for row in batch["prefix_tokens"]} == {"caption:"}
  c.data.video.prefix_length = 2
  with pytest.raises(ValueError, match="prefix_length=2"):
    pipeline.from_config(c, cache_dir)


def test_train_evaluate_and_predict_end_to_end(tmp_path):
  """A run with a text prefix and clips longer than its videos (padded, masked); then `t5jax.evaluate`, and
  `t5jax.predict` reading each clip exactly as the run's evaluation does."""
  wd = str(tmp_path / "run")
  flags = [
    "--config.total_steps=4",
    "--config.log_every=2",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
    "--config.batch_size=4",
    "--config.eval_steps=1",
    "--config.data.video.synthetic.count=24",
    "--config.data.video.eval_fraction=0.25",
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
    "--config.data.video.prefix=caption: ",
    "--config.data.video.short=pad",
    "--config.data.video.stride=3",
  ]
  out = subprocess.run(
    [sys.executable, "-m", "t5jax.train", f"--config={ROOT}/configs/video.py", f"--workdir={wd}", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in open(f"{wd}/metrics.jsonl")]
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["loss"]) for r in train)
  assert train[-1]["unreadable_videos_skipped"] == 0
  assert any("eval_loss" in r for r in rows)
  # `t5jax.evaluate` captions every held-out video of the run from its checkpoint.
  config = ml_collections.ConfigDict(workdir_lib.read_record(wd)["config"])
  os.makedirs(f"{wd}/checkpoints/99.orbax-checkpoint-tmp")  # as a save in flight of a run still training
  results = evaluate.run(config, wd)
  assert os.path.isdir(f"{wd}/checkpoints/99.orbax-checkpoint-tmp")  # a reader leaves it alone
  config.data.tokenizer.path = f"{wd}/spiece.model"
  data = pipeline.from_config(config, f"{wd}/cache")
  assert results["captions"]["num_examples"] == len(data.eval_examples)
  assert 0.0 <= results["captions"]["exact_match"] <= 100.0
  _check_predict(wd, data, tmp_path)


def _check_predict(wd, data, tmp_path):
  root = f"{wd}/cache/{video_dataset.SYNTHETIC_DIR}"
  paths = [os.path.join(root, p) for p, _ in data.eval_examples[:4]]
  # What predict feeds the model is the run's eval batch, array for array.
  v = inference.video_settings(wd)
  batch = inference.video_batch(video_dataset.sampler_from(v), video_dataset.prefix_tokens(data.tokenizer, v), paths, 4)
  assert set(batch) == set(INPUTS) and not batch["frame_mask"].all()
  for key in INPUTS:
    np.testing.assert_array_equal(batch[key], data.eval[0][key])
  params, model_config = t5jax.load_checkpoint(wd)
  model = VideoT5(model_config)
  expected = [data.tokenizer.decode(row) for row in np.asarray(greedy_captions(model, params, batch, 32))]
  # --video on the command line prints the caption; --input_file lists paths (a blank line stays blank).
  out = subprocess.run(
    [sys.executable, "-m", "t5jax.predict", f"--checkpoint={wd}", f"--video={paths[1]}", "--max_new_tokens=32"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == expected[1] + "\n"
  (tmp_path / "videos.txt").write_text(f"{paths[0]}\n\n{paths[3]}\n")
  predict_in_process(
    checkpoint=wd,
    input_file=str(tmp_path / "videos.txt"),
    output_file=str(tmp_path / "out.txt"),
    max_new_tokens=32,
    batch_size=2,
  )
  assert (tmp_path / "out.txt").read_text() == f"{expected[0]}\n\n{expected[3]}\n"
  # A bad video is a one-line error naming the file; a text question to a video model is refused.
  (tmp_path / "notes.mp4").write_text("not a video")
  for bad in (str(tmp_path / "notes.mp4"), str(tmp_path / "missing.mp4")):
    with pytest.raises(PredictError, match=re.escape(bad)) as e:
      predict_in_process(checkpoint=wd, video=bad)
    assert "\n" not in str(e.value)
  with pytest.raises(PredictError, match="is a video model"):
    predict_in_process(checkpoint=wd, input="a red square")

"""Clip arithmetic and device-side augmentation, with no file read: which frames a clip takes (training:
random and seeded; evaluation: centred; short videos looped or padded), the crop box, and the augmentation
that runs on the device (one draw per clip, deterministic per rng). Reading them from files: test_video.py."""

import jax
import numpy as np
import pytest

from t5jax.data.video import ClipSpec, clip_indices, crop_box
from t5jax.model import video_augment


def test_clip_indices_training_offsets_are_random_in_range_and_seeded():
  spec = ClipSpec(num_frames=8, stride=2)
  starts = set()
  for seed in range(50):
    idx, valid = clip_indices(100, 25.0, spec, np.random.default_rng((7, seed)))
    assert valid.all() and idx[0] >= 0 and idx[-1] < 100 and (np.diff(idx) == 2).all()
    again, _ = clip_indices(100, 25.0, spec, np.random.default_rng((7, seed)))
    assert (idx == again).all()
    starts.add(int(idx[0]))
  assert len(starts) > 20


def test_clip_indices_eval_is_centred_and_target_fps_sets_the_stride():
  idx, _ = clip_indices(100, 30.0, ClipSpec(num_frames=4, stride=10))
  assert idx.tolist() == [34, 44, 54, 64]  # span 31 frames, 69 left over, 34 before
  idx, _ = clip_indices(100, 30.0, ClipSpec(num_frames=4, target_fps=7.5))  # every 4th frame of 30 fps
  assert (np.diff(idx) == 4).all()
  idx, _ = clip_indices(100, 10.0, ClipSpec(num_frames=5, target_fps=4.0))  # 2.5 apart: the frame showing at each time
  assert np.diff(idx).tolist() == [2, 3, 2, 3]


def test_a_video_shorter_than_the_clip_is_looped_or_padded():
  idx, valid = clip_indices(5, 10.0, ClipSpec(num_frames=8, short="loop"))
  assert idx.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and valid.all()
  idx, valid = clip_indices(5, 10.0, ClipSpec(num_frames=8, short="pad"))
  assert idx.tolist() == [0, 1, 2, 3, 4, 4, 4, 4] and valid.tolist() == [True] * 5 + [False] * 3
  idx, _ = clip_indices(5, 10.0, ClipSpec(num_frames=8), np.random.default_rng(3))
  assert ((np.diff(idx) % 5) == 1).all()  # a random start, still consecutive modulo the length


def test_crop_box_is_centred_for_eval_and_random_within_bounds_for_training():
  assert crop_box(64, 96, (32, 32)) == (16, 32)
  boxes = {crop_box(64, 96, (32, 32), np.random.default_rng(s)) for s in range(30)}
  assert len(boxes) > 10 and all(0 <= t <= 32 and 0 <= l <= 64 for t, l in boxes)
  with pytest.raises(ValueError, match="larger"):
    crop_box(16, 16, (32, 32))


# --- Device-side augmentation ---------------------------------------------------------------------------


def still_clips(batch=2, frames=4):
  """uint8 [B, T, 48, 64, 3] clips whose frames are all the same picture (a different one per clip)."""
  pictures = np.random.default_rng(0).integers(0, 256, (batch, 1, 48, 64, 3), dtype=np.uint8)
  return np.repeat(pictures, frames, axis=1)


def test_augmentation_is_the_same_for_every_frame_and_deterministic_per_rng():
  config = video_augment.AugmentConfig(size=(32, 32))
  augment = jax.jit(lambda frames, rngs: video_augment.preprocess(frames, config, rngs))
  clips = still_clips()
  rngs = jax.random.split(jax.random.key(0), 2)
  out = np.asarray(augment(clips, rngs))
  assert out.shape == (2, 4, 32, 32, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 1:], np.broadcast_to(out[:, :1], out[:, 1:].shape))  # one draw per clip
  np.testing.assert_array_equal(np.asarray(augment(clips, rngs)), out)
  other = np.asarray(augment(clips, jax.random.split(jax.random.key(1), 2)))
  assert np.abs(other - out).mean() > 0.05
  # An example's augmentation depends on its own rng only, not on the rest of its batch.
  alone = np.asarray(augment(clips[:1], rngs[:1]))
  np.testing.assert_allclose(alone[0], out[0], atol=1e-5)


def test_eval_preprocessing_resizes_and_normalizes_without_randomness():
  config = video_augment.AugmentConfig(size=(24, 32))
  grey = np.full((1, 2, 48, 64, 3), 128, np.uint8)
  out = np.asarray(jax.jit(lambda f: video_augment.preprocess(f, config))(grey))
  assert out.shape == (1, 2, 24, 32, 3)
  want = (128 / 255 - np.asarray(config.mean)) / np.asarray(config.std)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)

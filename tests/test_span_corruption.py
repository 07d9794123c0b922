"""Span corruption: T5's lengths and counts, exact reconstruction, determinism; properties over many seeds."""

import numpy as np
import pytest

from t5jax.data.span_corruption import (
  compute_input_and_target_lengths,
  noise_counts,
  random_spans_noise_mask,
  span_corruption,
)

VOCAB = 32100  # T5: 32000 pieces + 100 extra ids
SEEDS = range(40)


def reconstruct(inputs, targets, vocab_size, num_sentinels=100):
  """Puts each sentinel's span (from targets) back in place of that sentinel (in inputs)."""

  def is_sentinel(t):
    return t >= vocab_size - num_sentinels

  spans, current = {}, None
  for t in targets[:-1]:  # drop EOS
    if is_sentinel(t):
      current = t
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inputs[:-1]:
    out.extend(spans[t] if is_sentinel(t) else [int(t)])
  return out


def random_tokens(rng, batch, length):
  return rng.integers(3, VOCAB - 100, size=(batch, length), dtype=np.int32)


def test_t5_lengths():
  assert compute_input_and_target_lengths(512) == (568, 114)
  assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
  # The rule T5 uses: inputs = nonnoise + spans + EOS must fit, and one more raw token would not.
  for inputs_length in (16, 32, 64, 128, 256, 1024):
    tokens_length, targets_length = compute_input_and_target_lengths(inputs_length)
    noise, spans = noise_counts(tokens_length, 0.15, 3.0)
    assert tokens_length - noise + spans + 1 <= inputs_length
    noise1, spans1 = noise_counts(tokens_length + 1, 0.15, 3.0)
    assert tokens_length + 1 - noise1 + spans1 + 1 > inputs_length
    assert targets_length == noise + spans + 1


@pytest.mark.parametrize(
  "length,density,mean", [(568, 0.15, 3.0), (100, 0.15, 3.0), (57, 0.3, 2.0), (10, 0.15, 3.0), (200, 0.5, 8.0)]
)
def test_mask_counts(length, density, mean):
  num_noise, num_spans = noise_counts(length, density, mean)
  assert num_noise == min(max(round(length * density), 1), length - 1)
  for seed in SEEDS:
    mask = random_spans_noise_mask(length, density, mean, np.random.default_rng(seed), batch=8)
    assert mask.shape == (8, length) and mask.dtype == bool
    assert (mask.sum(axis=1) == num_noise).all()
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    assert (starts.sum(axis=1) == num_spans).all()
    assert not mask[:, 0].any() and mask[:, -1].all()  # begins with non-noise, ends in noise


def test_568_counts():
  assert noise_counts(568, 0.15, 3.0) == (85, 28)  # round(85.2) = 85, round(85 / 3) = 28


def test_span_corruption_properties():
  tokens_length, targets_length = compute_input_and_target_lengths(512)
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    tokens = random_tokens(rng, 16, tokens_length)
    inputs, targets = span_corruption(tokens, rng, vocab_size=VOCAB, eos_id=1)
    assert inputs.shape == (16, 512) and targets.shape == (16, targets_length) == (16, 114)
    assert inputs.dtype == targets.dtype == np.int32
    assert (inputs[:, -1] == 1).all() and (targets[:, -1] == 1).all()
    assert (inputs != 0).all() and (targets != 0).all()  # no padding
    for row in range(16):
      sentinels_in = inputs[row][inputs[row] >= VOCAB - 100]
      sentinels_out = targets[row][targets[row] >= VOCAB - 100]
      expected = VOCAB - 1 - np.arange(28)  # <extra_id_0> = 32099, then counting down
      np.testing.assert_array_equal(sentinels_in, expected)
      np.testing.assert_array_equal(sentinels_out, expected)
      assert targets[row][0] == VOCAB - 1  # targets start with the first sentinel
      assert reconstruct(inputs[row], targets[row], VOCAB) == tokens[row].tolist()


def test_reconstruction_small_and_odd_shapes():
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    for length in (2, 3, 7, 50):
      tokens = random_tokens(rng, 3, length)
      inputs, targets = span_corruption(tokens, rng, vocab_size=VOCAB, noise_density=0.3, mean_noise_span_length=2.0)
      for row in range(3):
        assert reconstruct(inputs[row], targets[row], VOCAB) == tokens[row].tolist()


def test_deterministic_for_seed_and_varies_across_seeds():
  tokens = random_tokens(np.random.default_rng(0), 8, 568)
  runs = [span_corruption(tokens, np.random.default_rng(s), vocab_size=VOCAB) for s in (7, 7, 8)]
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  np.testing.assert_array_equal(runs[0][1], runs[1][1])
  assert not np.array_equal(runs[0][0], runs[2][0])
  # Rows of one batch get different masks too.
  assert not np.array_equal(runs[0][0][0] >= VOCAB - 100, runs[0][0][1] >= VOCAB - 100)


def test_masks_are_not_biased():
  # Every position but the first can be noise; over many rows the noise rate is near the density.
  mask = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(0), batch=4000)
  rate = mask.mean(axis=0)
  assert rate[0] == 0 and rate[1:].min() > 0.05
  assert abs(mask.mean() - 85 / 568) < 1e-9
  lengths = np.diff(np.flatnonzero(np.diff(np.pad(mask[0].astype(int), 1)) != 0))[::2]
  assert lengths.sum() == 85

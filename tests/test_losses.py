"""The loss: cross-entropy, z-loss, label smoothing and padding, against direct numpy computations."""

import jax
import numpy as np
import pytest

from t5jax import losses


def _batch(seed=0, vocab=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 5, vocab)).astype(np.float32) * 3
  targets = rng.integers(0, vocab, size=(2, 5))
  weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  return logits, targets, weights


def _log_softmax(x):
  x = x.astype(np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_cross_entropy_and_z_loss_match_numpy():
  logits, targets, weights = _batch()
  ce, zl, correct = jax.device_get(losses.cross_entropy_with_z_loss(logits, targets, weights, z_loss=1e-4))
  logp = _log_softmax(logits)
  want_ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zl, 1e-4 * log_z**2 * weights, rtol=1e-5)
  np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets) * weights)


def test_label_smoothing_is_kl_to_the_smoothed_targets():
  logits, targets, weights = _batch(1)
  vocab, eps = logits.shape[-1], 0.1
  ce, _, _ = jax.device_get(losses.cross_entropy_with_z_loss(
      logits, targets, weights, z_loss=0.0, label_smoothing=eps))
  q = np.full(logits.shape, eps / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1 - eps, -1)
  kl = (q * (np.log(q) - _log_softmax(logits))).sum(-1) * weights
  np.testing.assert_allclose(ce, kl, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_the_loss():
  logits, targets, weights = _batch(2)
  loss, m = losses.loss_and_metrics(logits, targets, weights)
  logits2 = logits.copy()
  logits2[0, 3:] = 1e3  # padded positions of row 0
  loss2, m2 = losses.loss_and_metrics(logits2, targets, weights)
  assert float(loss) == float(loss2)
  assert float(m["num_tokens"]) == 8


@pytest.mark.parametrize("normalizer", [None, 100.0])
def test_normalizer(normalizer):
  logits, targets, weights = _batch(3)
  loss, m = losses.loss_and_metrics(logits, targets, weights, normalizer=normalizer)
  denominator = float(weights.sum()) if normalizer is None else normalizer
  np.testing.assert_allclose(float(loss), float(m["loss_sum"]) / denominator, rtol=1e-6)
  summary = losses.summarize(jax.device_get(m))
  np.testing.assert_allclose(summary["loss"], summary["cross_entropy"] + summary["z_loss"], rtol=1e-6)

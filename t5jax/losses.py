"""The training loss of T5: token cross-entropy plus z-loss, with padding masked, and its metrics."""

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_with_z_loss(logits, targets, weights, *, z_loss=1e-4, label_smoothing=0.0):
  """Per-token loss terms.

  Args:
    logits: [batch, length, vocab], any float dtype (computed in float32 here).
    targets: [batch, length] int token ids.
    weights: [batch, length] 1.0 for real tokens, 0.0 for padding.
    z_loss: coefficient of log(Z)**2, which keeps the softmax normalizer near 1 so bfloat16 logits stay
      well-conditioned (T5X / PaLM use 1e-4).
    label_smoothing: mass spread uniformly over the other vocab entries.

  Returns:
    (cross_entropy, z_term, correct): each [batch, length] float32 and already multiplied by `weights`.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # With smoothing the target distribution is q = low everywhere and `confidence` at the label:
  # CE = log Z - sum(q * logits). Subtracting q's entropy makes a perfect prediction score 0.
  if label_smoothing:
    mean_logit = jnp.mean(logits, axis=-1)
    expected_logit = (confidence - low) * target_logit + low * vocab * mean_logit
    entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    cross_entropy = log_z - expected_logit - entropy
  else:
    cross_entropy = log_z - target_logit
  z_term = z_loss * jnp.square(log_z)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return cross_entropy * weights, z_term * weights, correct * weights


def loss_sums(logits, targets, weights, *, z_loss=1e-4, label_smoothing=0.0):
  """Summed loss terms and metrics of one batch (or microbatch, or device's share of it).

  Sums, not means: they add across microbatches and devices, and the train step divides the gradient once
  by the global batch's token count (or T5's constant normalizer), so the loss per token is the same with
  or without gradient accumulation and on any number of devices (tests/test_losses.py).
  """
  weights = weights.astype(jnp.float32)
  ce, zl, correct = cross_entropy_with_z_loss(logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing)
  return {
    "loss_sum": jnp.sum(ce) + jnp.sum(zl),
    "cross_entropy_sum": jnp.sum(ce),
    "z_loss_sum": jnp.sum(zl),
    "correct_sum": jnp.sum(correct),
    "num_tokens": jnp.sum(weights),
  }


def summarize(metrics):
  """Turns summed metrics (on host) into per-token means: loss, cross_entropy, z_loss, accuracy, and any
  `moe_*_sum` (router losses and metrics; a per-expert vector becomes one value per expert) or
  `distill_*_sum` (distill.py's loss against the teacher)."""
  n = max(float(metrics["num_tokens"]), 1.0)
  out = {
    "loss": float(metrics["loss_sum"]) / n,
    "cross_entropy": float(metrics["cross_entropy_sum"]) / n,
    "z_loss": float(metrics["z_loss_sum"]) / n,
    "accuracy": float(metrics["correct_sum"]) / n,
  }
  for key, value in metrics.items():
    if key.startswith(("moe_", "distill_")) and key.endswith("_sum"):
      mean = np.asarray(value, np.float64) / n
      out.update({f"{key[:-4]}_{i}": float(v) for i, v in enumerate(mean)} if mean.ndim else {key[:-4]: float(mean)})
  return out

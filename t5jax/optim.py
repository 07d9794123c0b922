"""Optimizers and learning-rate schedules from `config.optimizer`, as optax transformations."""

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("rsqrt", "cosine", "linear", "constant")
OPTIMIZERS = ("adafactor", "adamw")


def make_schedule(cfg, total_steps):
  """Learning rate as a function of the step.

  rsqrt: T5's inverse square root, lr * rsqrt(max(step, warmup) / warmup): constant `lr` for the first
    `warmup_steps`, then decaying as 1/sqrt(step). T5 pretraining used lr=0.01, warmup 10k (= 1/sqrt(10k)).
  cosine / linear: linear warmup from 0 to `lr`, then decay to `lr * end_lr_ratio` at `total_steps`
    (nanoT5 uses cosine with AdamW).
  """
  lr, warmup = cfg.learning_rate, max(int(cfg.warmup_steps), 0)
  if cfg.schedule == "rsqrt":
    w = max(warmup, 1)
    return lambda step: lr * jax.lax.rsqrt(jnp.maximum(step, w).astype(jnp.float32) / w)
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  end = lr * cfg.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
  # Decay matrices only: norm scales are 1-D and decaying them towards 0 only hurts.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, total_steps):
  """The optax chain for `config.optimizer`; returns (optimizer, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == "adafactor":
    # T5's Adafactor: factored second moments, no momentum, decay 0.8, update clipping at 1.0, and updates
    # scaled by each parameter's RMS so the step size is relative to the weight's own scale.
    core = optax.adafactor(
      learning_rate=schedule,
      decay_rate=cfg.adafactor_decay_rate,
      clipping_threshold=1.0,
      multiply_by_parameter_scale=True,
      factored=True,
      momentum=None,
      weight_decay_rate=cfg.weight_decay or None,
      weight_decay_mask=_decay_mask,
    )
  elif cfg.name == "adamw":
    steps = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    if cfg.rms_scaled:
      # nanoT5's AdamWScale: multiply the Adam step by the parameter's RMS (at least 1e-3), borrowing
      # Adafactor's relative step size; this is what lets AdamW train T5 at Adafactor-like learning rates.
      steps.append(optax.scale_by_param_block_rms(min_scale=1e-3))
    if cfg.weight_decay:
      steps.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
    steps.append(optax.scale_by_learning_rate(schedule))
    core = optax.chain(*steps)
  else:
    raise ValueError(f"optimizer.name={cfg.name!r} is unknown; choose one of {OPTIMIZERS}")
  if cfg.clip_grad_norm:
    core = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), core)
  return core, schedule

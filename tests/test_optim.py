"""Optimizers and schedules: T5's rsqrt, warmup + cosine/linear, Adafactor's factoring, nanoT5's RMS scaling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from t5jax import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(
    dict(
      name="adafactor",
      learning_rate=0.01,
      schedule="rsqrt",
      warmup_steps=100,
      end_lr_ratio=0.0,
      clip_grad_norm=0.0,
      weight_decay=0.0,
      adafactor_decay_rate=0.8,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      rms_scaled=False,
    )
  )
  c.update(kw)
  return c


def test_rsqrt_is_constant_then_inverse_sqrt():
  s = optim.make_schedule(_cfg(), total_steps=1000)
  for step in (0, 50, 100):
    np.testing.assert_allclose(float(s(step)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(s(400)), 0.005, rtol=1e-6)  # 0.01 * sqrt(100 / 400)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay(schedule):
  s = optim.make_schedule(_cfg(schedule=schedule, end_lr_ratio=0.1), total_steps=1000)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(50)), 0.005, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 0.01, rtol=1e-5)
  np.testing.assert_allclose(float(s(1000)), 0.001, rtol=1e-4)
  assert float(s(300)) > float(s(600)) > float(s(900))


def test_adafactor_factors_large_matrices():
  tx, _ = optim.make_optimizer(_cfg(), 100)
  state = tx.init({"w": jnp.zeros((256, 384)), "scale": jnp.zeros((256,))})
  factored = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row")) if hasattr(s, "v_row")][0]
  assert factored.v_row["w"].shape == (256,) and factored.v_col["w"].shape == (384,)


def test_rms_scaled_adamw_steps_relative_to_the_weight():
  tx, _ = optim.make_optimizer(_cfg(name="adamw", schedule="constant", rms_scaled=True), 100)
  params = {"small": jnp.full((4, 4), 0.01), "big": jnp.full((4, 4), 10.0)}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(g); the RMS scaling multiplies it by each weight's RMS.
  np.testing.assert_allclose(float(updates["big"][0, 0]) / float(updates["small"][0, 0]), 1000.0, rtol=1e-3)


@pytest.mark.parametrize(
  "kw",
  [
    dict(learning_rate=0.3),
    dict(name="adamw", schedule="cosine", learning_rate=0.05, warmup_steps=5),
    dict(
      name="adamw",
      schedule="linear",
      rms_scaled=True,
      learning_rate=0.5,
      weight_decay=0.01,
      clip_grad_norm=1.0,
      warmup_steps=5,
    ),
  ],
)
def test_each_optimizer_fits_a_regression(kw):
  tx, _ = optim.make_optimizer(_cfg(**kw), 200)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  w_true = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  params = {"w": jnp.full((8, 4), 0.1)}
  loss = lambda p: jnp.mean((x @ p["w"] - x @ w_true) ** 2)
  state = tx.init(params)
  first = float(loss(params))
  for _ in range(200):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.2 * first


@pytest.mark.parametrize("kw,word", [(dict(name="sgd"), "optimizer.name"), (dict(schedule="step"), "schedule")])
def test_unknown_names_are_errors(kw, word):
  with pytest.raises(ValueError, match=word):
    optim.make_optimizer(_cfg(**kw), 100)

"""The loss: cross-entropy, z-loss, label smoothing and padding, against direct numpy computations."""

import jax
import numpy as np

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
  ce, _, _ = jax.device_get(losses.cross_entropy_with_z_loss(logits, targets, weights, z_loss=0.0, label_smoothing=eps))
  q = np.full(logits.shape, eps / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1 - eps, -1)
  kl = (q * (np.log(q) - _log_softmax(logits))).sum(-1) * weights
  np.testing.assert_allclose(ce, kl, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_the_loss():
  logits, targets, weights = _batch(2)
  m = losses.loss_sums(logits, targets, weights)
  logits2 = logits.copy()
  logits2[0, 3:] = 1e3  # padded positions of row 0
  m2 = losses.loss_sums(logits2, targets, weights)
  assert float(m["loss_sum"]) == float(m2["loss_sum"])
  assert float(m["num_tokens"]) == 8
  summary = losses.summarize(jax.device_get(m))
  np.testing.assert_allclose(summary["loss"], summary["cross_entropy"] + summary["z_loss"], rtol=1e-6)


# The one loss normalization (steps.make_grad_fn): summed over microbatches and devices, divided once.


def _tiny_config(**overrides):
  import ml_collections
  from configs import base
  from t5jax.model import get_preset

  config = base.get_config()
  config.model = ml_collections.ConfigDict(get_preset("t5.1.1-tiny"))
  config.batch_size = 8
  for key, value in overrides.items():
    config[key] = value
  return config


def _uneven_batch():
  rng = np.random.default_rng(0)
  targets = rng.integers(3, 500, (8, 12)).astype(np.int32)
  targets[:3, 9:] = 0  # padding, unevenly spread over microbatches and devices
  return {
    "encoder_input_tokens": rng.integers(3, 500, (8, 20)).astype(np.int32),
    "decoder_target_tokens": targets,
    "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], 1),
    "decoder_loss_weights": (targets > 0).astype(np.int32),
  }


def _grads(config, batch):
  from t5jax import steps
  from t5jax.model import T5, T5Config, init_params

  model_config = T5Config.from_dict(config.model.to_dict())
  params = init_params(model_config, jax.random.PRNGKey(0))
  return jax.jit(steps.make_grad_fn(T5(model_config), config))(params, batch, jax.random.PRNGKey(1))


def _assert_same(a, b, rtol=1e-5):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def test_gradient_accumulation_gives_the_loss_and_gradients_of_the_whole_batch():
  batch = _uneven_batch()
  g1, m1 = _grads(_tiny_config(grad_accum_steps=1), batch)
  g4, m4 = _grads(_tiny_config(grad_accum_steps=4), batch)
  assert float(m1["num_tokens"]) == float(m4["num_tokens"]) == 8 * 12 - 3 * 3
  np.testing.assert_allclose(float(m4["loss_sum"]), float(m1["loss_sum"]), rtol=1e-5)
  _assert_same(g4, g1)


def test_constant_normalizer_divides_the_summed_gradient():
  batch = _uneven_batch()
  per_token, m = _grads(_tiny_config(), batch)
  config = _tiny_config()
  config.loss.normalizer = 1000.0
  constant, _ = _grads(config, batch)
  _assert_same(jax.tree.map(lambda g: g * float(m["num_tokens"]) / 1000.0, per_token), constant, rtol=1e-5)


_DEVICES_SCRIPT = """
import sys, numpy as np, jax, ml_collections
sys.path.insert(0, sys.argv[1])
from jax.sharding import PartitionSpec as P
from tests.test_losses import _tiny_config, _uneven_batch
from t5jax import parallel, setup, steps
batch = _uneven_batch()
out, fresh = {}, {}
MOE = dict(moe=ml_collections.ConfigDict(dict(num_experts=4, every_encoder=2, every_decoder=2, capacity_factor_train=2.0)))
BLOCK = dict(attention_impl="blockwise", attention_block_q=8, attention_block_k=8)   # tiles of 8 x 8
for name, sizes, mode, model in [("one", {"data": 1}, "jit", {}), ("data8", {"data": 8}, "jit", {}),
                                 ("fsdp8", {"fsdp": 8}, "jit", {}), ("pmap8", {"data": 8}, "pmap", {}),
                                 ("moe_one", {"data": 1}, "jit", MOE), ("moe_expert4", {"data": 2, "expert": 4}, "jit", MOE),
                                 ("block_one", {"data": 1}, "jit", BLOCK),
                                 ("block_mesh8", {"data": 2, "fsdp": 2, "tensor": 2}, "jit", BLOCK),
                                 ("block_pmap8", {"data": 8}, "pmap", BLOCK)]:
  config = _tiny_config()
  config.parallel.mode = mode
  config.model.update(model)
  moe = "moe" in model   # the same params for dense and blockwise attention
  mesh = parallel.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  with parallel.use_mesh(mesh, mode):
    run = setup.build(config, mesh)
    if moe not in fresh:   # each model's params are made once, on its one-device layout, then placed
      fresh[moe] = jax.device_get(run.init_state(seed=0)["params"])
    params = jax.device_put(fresh[moe], run.state_sharding["params"])
    axes = parallel.BATCH_AXES if mode == "pmap" else None
    grad_fn = steps.make_grad_fn(run.model, config, data_axes=axes)
    if axes:
      grad_fn = jax.shard_map(grad_fn, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()),
                              check_vma=False)
    grads, m = jax.jit(grad_fn)(params, parallel.host_to_global(batch, run.batch_sharding), jax.random.PRNGKey(1))
  leaves = jax.tree.leaves(jax.device_get(grads))
  out.update({f"{name}/{i}": x for i, x in enumerate(leaves)}, **{f"{name}/loss": np.float64(m["loss_sum"])})
config = _tiny_config()
config.model.moe = ml_collections.ConfigDict(dict(MOE["moe"].to_dict(), num_experts=6))
mesh = parallel.make_mesh({"data": 2, "expert": 4})
try:
  with parallel.use_mesh(mesh):
    setup.build(config, mesh)
except ValueError as e:
  print("ERROR:", e)
np.savez(sys.argv[2], **out)
"""


def test_one_and_eight_devices_give_the_same_loss_and_gradients(tmp_path):
  """Data, fsdp and pmap layouts of a dense T5, a mixture of experts with its experts sharded 4 ways, and
  blockwise attention (on one device, on data x fsdp x tensor, and in pmap mode) against dense attention."""
  import os
  import subprocess
  import sys
  from conftest import host_devices_env

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", _DEVICES_SCRIPT, root, str(tmp_path / "g.npz")],
    cwd=root,
    env=host_devices_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  saved = np.load(tmp_path / "g.npz")
  pairs = [("one", "data8"), ("one", "fsdp8"), ("one", "pmap8"), ("moe_one", "moe_expert4")]
  pairs += [("one", "block_one"), ("one", "block_mesh8"), ("one", "block_pmap8")]
  for reference, layout in pairs:
    keys = [k for k in saved.files if k.startswith(f"{reference}/")]
    assert keys
    for key in keys:
      np.testing.assert_allclose(
        saved[key.replace(f"{reference}/", f"{layout}/")], saved[key], rtol=1e-5, atol=1e-7, err_msg=f"{layout}: {key}"
      )
  # Experts sharded over the `expert` axis must divide evenly.
  assert "ERROR: config.model.moe.num_experts=6 does not divide over the mesh's expert axis of 4 devices" in out.stdout

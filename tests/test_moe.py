"""Tests of t5jax.model.moe on inputs whose outcome is known: routing and capacity, aux losses, equivalences
with the dense FFN, gradients, scan / remat / cached decoding, config errors."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5jax.decode import init_cache
from t5jax.model import T5, T5Config, init_params, layer_stack, param_axes
from t5jax.model import moe
from t5jax.model.layers import MLP
from t5jax.model.config import MoeConfig

# 4 encoder layers with experts in layers 1 and 3 (a scanned block of 2), 2 decoder layers both sparse.
TINY = dict(
  vocab_size=64,
  d_model=16,
  num_heads=2,
  d_kv=8,
  d_ff=32,
  num_encoder_layers=4,
  num_decoder_layers=2,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
)
MOE = dict(num_experts=4, every_encoder=2, every_decoder=1)
MOE_FIELDS = {f.name for f in dataclasses.fields(MoeConfig)}


def make_config(**overrides):
  """TINY with its MOE group; an override names a T5Config field or a MoeConfig one (num_experts=0: dense)."""
  moe = dict(MOE, **{k: overrides.pop(k) for k in list(overrides) if k in MOE_FIELDS})
  return T5Config.from_dict(dict(TINY, **overrides, moe=moe)).validate()


def with_moe(cfg, **changes):
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


def ids_batch(seed=0, batch=2, enc_len=8, dec_len=6):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.integers(1, 64, (batch, enc_len)), jnp.int32),
    jnp.asarray(rng.integers(1, 64, (batch, dec_len)), jnp.int32),
  )


def moe_apply(cfg, params, x, deterministic=True, rngs=None):
  """MoeMLP on x [batch, len, embed] -> (out, aux loss, metrics)."""
  out, mut = moe.MoeMLP(cfg).apply({"params": params}, x, deterministic, rngs=rngs, mutable=moe.COLLECTIONS)
  return (out,) + moe.summarize(mut)


# ---------------------------------------------------------------------------------------------------------
# Routing and capacity.


def test_capacity_sizes():
  cfg = make_config(capacity_factor_train=1.25, capacity_factor_eval=2.0)
  assert moe.expert_capacity(cfg, 8, deterministic=False) == 3  # ceil(1.25 * 8 / 4)
  assert moe.expert_capacity(cfg, 8, deterministic=True) == 4  # 2.0 * 8 / 4
  assert moe.expert_capacity(with_moe(cfg, top_k=2), 8, False) == 5  # ceil(1.25 * 16 / 4)
  assert moe.expert_capacity(with_moe(cfg, expert_capacity=3), 8, True) == 3
  assert moe.expert_capacity(with_moe(cfg, capacity_factor_eval=100.0), 8, True) == 8
  assert moe.group_size(12, 8) == 6 and moe.group_size(16, 4096) == 16 and moe.group_size(7, 4) == 1


def test_top1_keeps_tokens_in_position_order_up_to_capacity():
  # Six tokens choosing experts 0 0 0 1 0 1 with two slots each: the third and fourth picks of expert 0 drop.
  choice = np.array([0, 0, 0, 1, 0, 1])
  logits = jnp.asarray(np.eye(2)[choice][None] * 3.0, jnp.float32)  # [1 group, 6, 2 experts]
  r = moe.token_choice(logits, top_k=1, capacity=2)
  np.testing.assert_array_equal(r.expert[0, :, 0], choice)
  np.testing.assert_array_equal(r.position[0, :, 0], [0, 1, 2, 0, 2, 1])  # 2 = capacity = dropped
  p = math.exp(3) / (math.exp(3) + 1)
  np.testing.assert_allclose(r.gate[0, :, 0], [p, p, 0, p, 0, p], rtol=1e-6)
  metrics = moe.routing_metrics(r, 2, expert_choice_router=False)
  np.testing.assert_allclose(metrics["fraction_dropped"], 2 / 6)
  np.testing.assert_allclose(metrics["expert_load"], [4 / 6, 2 / 6])


def test_top2_serves_first_choices_before_second_choices():
  # Probabilities whose first / second choices are: token 0 -> 0, 1; token 1 -> 0, 2; token 2 -> 1, 0.
  probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.3, 0.6, 0.1]])
  r = moe.token_choice(jnp.log(jnp.asarray(probs[None], jnp.float32)), top_k=2, capacity=1)
  np.testing.assert_array_equal(r.expert[0], [[0, 1], [0, 2], [1, 0]])
  # Expert 0 goes to token 0's first choice; token 1's first choice (also 0) then has no slot, though it
  # comes before any second choice. Expert 1's slot goes to token 2's first choice, not token 0's second.
  np.testing.assert_array_equal(r.position[0], [[0, 1], [1, 0], [0, 1]])
  np.testing.assert_allclose(r.gate[0], [[0.6 / 0.9, 0], [0, 0.4 / 0.9], [0.6 / 0.9, 0]], rtol=1e-6)


def test_expert_choice_takes_each_experts_top_tokens():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
  r = moe.expert_choice(jnp.log(jnp.asarray(probs[None], jnp.float32)), capacity=2)
  # Expert 0 takes tokens 0 and 1 (its two highest), expert 1 tokens 2 and 3; token 3 ranks second for expert 1.
  kept = np.asarray(r.position[0] < 2)
  np.testing.assert_array_equal(kept, [[1, 0], [1, 0], [0, 1], [0, 1]])
  np.testing.assert_array_equal(np.asarray(r.position[0])[kept.astype(bool)], [0, 1, 0, 1])
  np.testing.assert_allclose(np.asarray(r.gate[0]), probs * kept, rtol=1e-6)
  np.testing.assert_allclose(moe.routing_metrics(r, 2, expert_choice_router=True)["fraction_dropped"], 0.0)


def _forced_router_params(cfg, expert, seed=0):
  """MoeMLP params whose router sends every token to `expert` (and whose inputs are all positive)."""
  params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(seed), jnp.ones((1, 4, cfg.d_model)))["params"])
  kernel = np.zeros((cfg.d_model, cfg.num_experts), np.float32)
  kernel[:, expert] = 1.0
  return dict(params, router={"kernel": jnp.asarray(kernel)})


def test_hf_capacity_drops_per_sequence_and_dropped_tokens_output_zero():
  cfg = make_config(expert_capacity=2)
  params = _forced_router_params(cfg, expert=3)
  x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (2, 5, cfg.d_model)), jnp.float32)
  out, _, metrics = moe_apply(cfg, params, x)
  # Per sequence, the first two tokens fill expert 3's two slots; the other three get zero.
  norms = np.abs(np.asarray(out)).sum(-1)
  assert (norms[:, :2] > 0).all() and (norms[:, 2:] == 0).all()
  np.testing.assert_allclose(metrics["fraction_dropped"], 3 / 5)
  np.testing.assert_allclose(metrics["expert_load"], [0, 0, 0, 1])


def test_t5x_groups_share_capacity_across_sequences():
  # One group of all 10 tokens with ceil(1.0 * 10 / 4) = 3 slots: only the first sequence's first 3 tokens pass.
  cfg = make_config(capacity_factor_eval=1.0, group_size=16)
  params = _forced_router_params(cfg, expert=0)
  x = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (2, 5, cfg.d_model)), jnp.float32)
  out, _, metrics = moe_apply(cfg, params, x)
  norms = np.abs(np.asarray(out)).sum(-1)
  assert (norms[0, :3] > 0).all() and (norms[0, 3:] == 0).all() and (norms[1] == 0).all()
  np.testing.assert_allclose(metrics["fraction_dropped"], 7 / 10)


def test_a_cached_decoding_step_drops_nothing():
  # Two sequences' single tokens both pick expert 0, which has ceil(1.0 * 2 / 4) = 1 slot outside decoding.
  cfg = make_config(capacity_factor_eval=1.0)
  params = _forced_router_params(cfg, expert=0)
  x = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, (2, 1, cfg.d_model)), jnp.float32)
  np.testing.assert_allclose(moe_apply(cfg, params, x)[2]["fraction_dropped"], 0.5)
  out, mut = moe.MoeMLP(cfg).apply({"params": params}, x, True, True, mutable=moe.COLLECTIONS)
  np.testing.assert_allclose(moe.summarize(mut)[1]["fraction_dropped"], 0.0)
  assert (np.abs(np.asarray(out)).sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------------
# Aux losses.


def test_aux_losses_have_their_exact_values_on_a_hand_built_routing():
  # Two tokens, two experts: probabilities (3/4, 1/4) and (1/2, 1/2); both pick expert 0 (ties go low).
  # balance = E * sum_e f_e P_e = 2 * (1 * 5/8 + 0 * 3/8) = 5/4;  z = mean(log(4)^2, log(2)^2) = 5/2 log(2)^2.
  logits = np.array([[[math.log(3.0), 0.0], [0.0, 0.0]]], np.float32)
  r = moe.token_choice(jnp.asarray(logits), top_k=1, capacity=2)
  np.testing.assert_allclose(moe.load_balancing_loss(r), 1.25, rtol=1e-6)
  np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits)), 2.5 * math.log(2) ** 2, rtol=1e-6)
  # Through the layer: the router kernel is the identity, so the inputs are the logits.
  cfg = make_config(num_experts=2, d_model=2, balance_loss_weight=0.01, z_loss_weight=1e-3)
  params = dict(_forced_router_params(cfg, 0), router={"kernel": jnp.eye(2)})
  _, aux, metrics = moe_apply(cfg, params, jnp.asarray(logits))
  np.testing.assert_allclose(aux, 0.01 * 1.25 + 1e-3 * 2.5 * math.log(2) ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["balance_loss"], 1.25, rtol=1e-6)
  entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(0.5)) / 2
  np.testing.assert_allclose(metrics["router_entropy"], entropy, rtol=1e-6)


def test_balance_loss_is_one_for_uniform_top1_routing():
  logits = jnp.asarray(np.eye(4)[None] * 2.0, jnp.float32)  # token i -> expert i, probabilities symmetric
  np.testing.assert_allclose(moe.load_balancing_loss(moe.token_choice(logits, 1, 4)), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Equivalences with the dense FFN and between dispatches.


def _identical_experts(cfg, seed=0):
  """(dense MLP params, MoeMLP params whose every expert is that MLP, with a random router)."""
  x = jnp.ones((1, 4, cfg.d_model))
  dense = nn.meta.unbox(MLP(cfg.d_ff, cfg.feed_forward_proj).init(jax.random.key(seed), x)["params"])
  params = _forced_router_params(cfg, 0, seed)
  params["router"] = {"kernel": jax.random.normal(jax.random.key(seed + 1), (cfg.d_model, cfg.num_experts))}
  params["experts"] = {
    k: jnp.broadcast_to(v["kernel"], (cfg.num_experts,) + v["kernel"].shape) for k, v in dense.items()
  }
  return dense, params


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_identical_experts_with_ample_capacity_equal_the_dense_ffn(proj):
  cfg = make_config(feed_forward_proj=proj, capacity_factor_eval=4.0)
  dense, params = _identical_experts(cfg)
  x = jax.random.normal(jax.random.key(2), (2, 6, cfg.d_model))
  ref = MLP(cfg.d_ff, proj).apply({"params": dense}, x)
  out1, _, metrics = moe_apply(cfg, params, x)
  assert float(metrics["fraction_dropped"]) == 0.0
  # Switch scales the chosen expert's output by its probability; top-2's renormalized gates sum to 1.
  p_top = jnp.max(jax.nn.softmax(x @ params["router"]["kernel"], axis=-1), axis=-1, keepdims=True)
  np.testing.assert_allclose(out1, p_top * ref, atol=1e-5, rtol=1e-5)
  out2, _, _ = moe_apply(with_moe(cfg, top_k=2), params, x)
  np.testing.assert_allclose(out2, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_ragged_dispatch_equals_einsum_dispatch_with_drops(top_k):
  cfg = make_config(top_k=top_k, capacity_factor_eval=0.5)
  params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(0), jnp.ones((1, 4, cfg.d_model)))["params"])
  x = jax.random.normal(jax.random.key(3), (2, 8, cfg.d_model))
  loss = lambda c: lambda p: jnp.sum(moe_apply(c, p, x)[0] ** 2)
  ref, ref_grad = jax.value_and_grad(loss(cfg))(params)
  out, grad = jax.value_and_grad(loss(with_moe(cfg, dispatch="ragged")))(params)
  assert float(moe_apply(cfg, params, x)[2]["fraction_dropped"]) > 0
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, ref_grad)


# ---------------------------------------------------------------------------------------------------------
# Training: gradients, jitter.


@pytest.mark.parametrize("router,top_k", [("token_choice", 1), ("token_choice", 2), ("expert_choice", 1)])
def test_gradients_reach_the_router(router, top_k):
  cfg = make_config(router=router, top_k=top_k, every_decoder=0 if router == "expert_choice" else 1)
  params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(0), jnp.ones((1, 4, cfg.d_model)))["params"])
  x = jax.random.normal(jax.random.key(4), (2, 8, cfg.d_model))
  task = jax.grad(lambda p: jnp.sum(moe_apply(cfg, p, x)[0] ** 2))(params)  # through the gates alone
  assert float(jnp.abs(task["router"]["kernel"]).max()) > 0
  aux = jax.grad(lambda p: moe_apply(cfg, p, x)[1])(params)  # through the aux losses alone
  assert float(jnp.abs(aux["router"]["kernel"]).max()) > 0


def test_jitter_perturbs_routing_only_in_training():
  cfg = make_config(jitter=0.5)
  params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(0), jnp.ones((1, 4, cfg.d_model)))["params"])
  x = jax.random.normal(jax.random.key(5), (2, 8, cfg.d_model))
  z_eval = moe_apply(cfg, params, x)[2]["z_loss"]
  np.testing.assert_allclose(z_eval, moe_apply(with_moe(cfg, jitter=0.0), params, x)[2]["z_loss"])
  z_train = moe_apply(cfg, params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})[2]["z_loss"]
  assert abs(float(z_train) - float(z_eval)) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# In the model: param tree, scan, remat, cached decoding.


def test_sparse_layers_follow_switch_convention_and_dense_names_stay():
  cfg = make_config()
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  enc = params["encoder"]
  assert [("experts" in enc[f"layers_{i}"]["mlp"]) for i in range(4)] == [False, True, False, True]
  assert set(enc["layers_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}
  assert enc["layers_1"]["mlp"]["experts"]["wi_0"].shape == (4, 16, 32)
  assert enc["layers_1"]["mlp"]["router"]["kernel"].shape == (16, 4)
  assert all("experts" in params["decoder"][f"layers_{i}"]["mlp"] for i in range(2))
  axes = param_axes(dataclasses.replace(cfg, scan_layers=True))
  assert tuple(axes["encoder"]["layers"]["layer_1"]["mlp"]["experts"]["wo"]) == ("layers", "experts", "mlp", "embed")
  assert tuple(axes["decoder"]["layers"]["mlp"]["experts"]["wi_0"]) == ("layers", "experts", "embed", "mlp")


def _model_outputs(cfg, params, ids, dec):
  logits, mut = T5(cfg).apply({"params": params}, ids, dec, mutable=moe.COLLECTIONS)
  return (logits,) + moe.summarize(mut)


@pytest.fixture(scope="module")
def model():
  cfg = make_config(capacity_factor_eval=1.0)  # tight: some tokens drop, which scan must reproduce
  return cfg, init_params(cfg, jax.random.key(0))


def test_scanned_matches_unscanned(model):
  cfg, params = model
  ids, dec = ids_batch()
  ref_logits, ref_aux, ref_metrics = jax.jit(_model_outputs, static_argnums=0)(cfg, params, ids, dec)
  assert float(ref_metrics["fraction_dropped"]) > 0
  scan = dataclasses.replace(cfg, scan_layers=True)
  stacked = layer_stack.stack_layers(params, cfg)
  assert stacked["encoder"]["layers"]["layer_1"]["mlp"]["experts"]["wo"].shape == (2, 4, 32, 16)
  logits, aux, metrics = jax.jit(_model_outputs, static_argnums=0)(scan, stacked, ids, dec)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux, ref_aux, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), metrics, ref_metrics)
  jax.tree.map(np.testing.assert_array_equal, layer_stack.unstack_layers(stacked, cfg), params)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_identical_loss_and_grads(model, scan):
  cfg, params = model
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  params = layer_stack.stack_layers(params, cfg) if scan else params
  ids, dec = ids_batch()

  def loss(p, c):
    logits, aux, _ = _model_outputs(c, p, ids, dec)
    return jnp.mean(logits**2) + aux

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref, ref_grads = grad(params, cfg)
  out, out_grads = grad(params, dataclasses.replace(cfg, remat_policy="full"))
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), out_grads, ref_grads)
  router = ref_grads["decoder"]["layers" if scan else "layers_0"]["mlp"]["router"]["kernel"]
  assert float(jnp.abs(router).max()) > 0


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_matches_full_forward(model, scan):
  # Ample capacity: a decoding step routes one token per sequence, so only an undropped forward can match.
  cfg, params = model
  cfg = dataclasses.replace(with_moe(cfg, capacity_factor_eval=8.0), scan_layers=scan)
  params = layer_stack.stack_layers(params, cfg) if scan else params
  ids, dec = ids_batch()
  mask = ids != 0
  full = T5(cfg).apply({"params": params}, ids, dec)
  encoded = T5(cfg).apply({"params": params}, ids, mask, method=T5.encode)
  cache = init_cache(cfg, params, encoded, mask, max_decode_len=dec.shape[1])

  @jax.jit
  def step(cache, token):
    logits, mut = T5(cfg).apply(
      {"params": params, "cache": cache}, encoded, mask, token, decode=True, method=T5.decode, mutable=["cache"]
    )
    return logits[:, 0], mut["cache"]

  steps = []
  for t in range(dec.shape[1]):
    logits, cache = step(cache, dec[:, t : t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_dense_model_sows_nothing():
  cfg = make_config(num_experts=0)
  params = init_params(cfg, jax.random.key(0))
  ids, dec = ids_batch()
  _, aux, metrics = _model_outputs(cfg, params, ids, dec)
  assert float(aux) == 0.0 and metrics == {}


# ---------------------------------------------------------------------------------------------------------
# Config errors.


@pytest.mark.parametrize(
  "overrides,culprit",
  [
    (dict(top_k=5), "moe.top_k"),
    (dict(capacity_factor_train=0.0), "moe.capacity_factor_train"),
    (dict(capacity_factor_eval=-1.0), "moe.capacity_factor_eval"),
    (dict(router="expert_choice"), "moe.router"),  # the decoder has experts
    (dict(router="hash"), "moe.router"),
    (dict(router="expert_choice", every_decoder=0, dispatch="ragged"), "moe.dispatch"),
    (dict(group_size=0), "moe.group_size"),
    (dict(expert_parallel="pjit"), "moe.expert_parallel"),
    (dict(expert_parallel="all_to_all", dispatch="ragged"), "moe.expert_parallel"),
    (dict(num_encoder_layers=3, scan_layers=True), "moe.every_encoder"),
  ],
)
def test_config_errors_are_one_line_and_name_the_setting(overrides, culprit):
  with pytest.raises(ValueError, match=culprit) as err:
    make_config(**overrides)
  assert "\n" not in str(err.value)


def test_configs_moe_trains_with_its_router_losses_in_the_loss_and_metrics(tmp_path, corpus_file):
  """configs/moe.py through the train loop: the aux loss joins the training loss, the router metrics are logged."""
  from conftest import ROOT, tiny_config
  from t5jax import train
  from t5jax.metrics import read_metrics

  config = tiny_config(corpus_file, f"--config={ROOT}/configs/moe.py")
  config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = 4, 2, 4, 4
  train.run(config, str(tmp_path / "run"))
  rows = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert r["loss"] == pytest.approx(r["cross_entropy"] + r["z_loss"] + r["moe_aux_loss"], rel=1e-5)
    # Summed over the sparse layers (layer 1 of each 2-layer stack); the router metrics are their means.
    assert r["moe_aux_loss"] == pytest.approx(2 * (0.01 * r["moe_balance_loss"] + 1e-3 * r["moe_z_loss"]), rel=1e-4)
    loads = [r[f"moe_expert_load_{e}"] for e in range(8)]
    assert sum(loads) == pytest.approx(1.0, rel=1e-5) and 0 <= r["moe_fraction_dropped"] < 1
    assert 0 < r["moe_router_entropy"] <= np.log(8) + 1e-6

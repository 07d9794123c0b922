"""Tests of t5jax.model: shapes, scan/remat/cache equivalences, masking, the tied head, init scales, dropout,
packing. (Buckets, presets and config errors: tests/test_model_config.py.)"""

import dataclasses
import functools


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5jax.decode import init_cache
from t5jax.model import T5, T5Config, get_preset, init_params, layer_stack, param_axes


def make_config(name="t5-tiny", **overrides):
  return T5Config.from_dict(dict(get_preset(name), **overrides))


@functools.lru_cache(maxsize=None)
def forward(cfg):
  """A jitted `T5(cfg).apply` (one compile per config and shape: op-by-op dispatch is slower here)."""
  return jax.jit(T5(cfg).apply, static_argnames=("deterministic", "method"))


@pytest.fixture(scope="module")
def tiny():
  """{name: (config, params)} for the two tiny presets, built once."""
  out = {}
  for i, name in enumerate(["t5-tiny", "t5.1.1-tiny"]):
    cfg = make_config(name)
    out[name] = (cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(i)))
  return out


def batch(cfg, enc_lens=(7, 4), dec_len=6, seed=0):
  """Encoder ids padded with 0 after each row's length, decoder ids with no padding."""
  rng = np.random.default_rng(seed)
  enc_len = max(enc_lens)
  ids = rng.integers(1, cfg.vocab_size, (len(enc_lens), enc_len))
  ids = np.where(np.arange(enc_len)[None] < np.array(enc_lens)[:, None], ids, 0)
  dec = rng.integers(1, cfg.vocab_size, (len(enc_lens), dec_len))
  return jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32)


def flat_shapes(params):
  return {"/".join(k.key for k in path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)}


# ---------------------------------------------------------------------------------------------------------
# Shapes, dtypes, pinned param tree.


@pytest.mark.parametrize("name", ["t5-tiny", "t5.1.1-tiny"])
def test_logits_shape_and_dtype(tiny, name):
  cfg, params = tiny[name]
  ids, dec = batch(cfg)
  logits = forward(cfg)({"params": params}, ids, dec)
  assert logits.shape == (2, 6, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  encoded = T5(cfg).apply({"params": params}, ids, method=T5.encode)
  assert encoded.shape == (2, 7, cfg.d_model)


def test_bfloat16_compute_keeps_float32_params(tiny):
  cfg, params = tiny["t5.1.1-tiny"]
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  fresh = jax.eval_shape(lambda: init_params(bf16, jax.random.key(0)))
  assert {x.dtype for x in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}
  ids, dec = batch(cfg)
  ref = np.asarray(forward(cfg)({"params": params}, ids, dec))
  out = forward(bf16)({"params": params}, ids, dec)
  assert out.dtype == jnp.float32
  # bf16 has ~3 significant digits; a real bug (wrong cast, lost norm) moves logits by O(their scale).
  assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()
  assert np.abs(np.asarray(out) - ref).max() > 0  # and the compute really was bf16


def _layer_shapes(prefix, block, n):
  return {f"{prefix}/layers_{i}/{k}": v for i in range(n) for k, v in block.items()}


ATTN = {"query/kernel": (64, 4, 16), "key/kernel": (64, 4, 16), "value/kernel": (64, 4, 16), "out/kernel": (4, 16, 64)}
RELU_MLP = {"mlp/wi/kernel": (64, 128), "mlp/wo/kernel": (128, 64)}
GATED_MLP = {"mlp/wi_0/kernel": (64, 128), "mlp/wi_1/kernel": (64, 128), "mlp/wo/kernel": (128, 64)}


def _pinned(mlp):
  enc = {
    "attention_norm/scale": (64,),
    **{f"attention/{k}": v for k, v in ATTN.items()},
    "mlp_norm/scale": (64,),
    **mlp,
  }
  dec = {
    "self_attention_norm/scale": (64,),
    **{f"self_attention/{k}": v for k, v in ATTN.items()},
    "cross_attention_norm/scale": (64,),
    **{f"cross_attention/{k}": v for k, v in ATTN.items()},
    "mlp_norm/scale": (64,),
    **mlp,
  }
  return {
    "shared_embedding/embedding": (512, 64),
    "encoder/relpos_bias/rel_embedding": (32, 4),
    "encoder/final_norm/scale": (64,),
    "decoder/relpos_bias/rel_embedding": (32, 4),
    "decoder/final_norm/scale": (64,),
    **_layer_shapes("encoder", enc, 2),
    **_layer_shapes("decoder", dec, 2),
  }


PINNED = {"t5-tiny": _pinned(RELU_MLP), "t5.1.1-tiny": {**_pinned(GATED_MLP), "lm_head/kernel": (64, 512)}}


@pytest.mark.parametrize("name", ["t5-tiny", "t5.1.1-tiny"])
def test_param_tree_is_pinned(tiny, name):
  assert flat_shapes(tiny[name][1]) == PINNED[name]


def test_scanned_param_tree_and_axes():
  cfg = make_config("t5.1.1-tiny", scan_layers=True)
  scanned = flat_shapes(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  expected = {}
  for path, shape in PINNED["t5.1.1-tiny"].items():
    if "/layers_1/" in path:
      continue
    expected[path.replace("/layers_0/", "/layers/")] = (2,) + shape if "/layers_0/" in path else shape
  assert scanned == expected
  axes = param_axes(cfg)
  assert tuple(axes["encoder"]["layers"]["attention"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(axes["decoder"]["relpos_bias"]["rel_embedding"]) == ("relpos_buckets", "heads")
  assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")
  # Every parameter is named on every axis.
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  for spec, x in zip(
    jax.tree.leaves(axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
    jax.tree.leaves(shapes),
    strict=True,
  ):
    assert len(spec) == len(x.shape) and None not in spec


# ---------------------------------------------------------------------------------------------------------
# Equivalences: scan, remat, cached decoding.


@pytest.mark.parametrize("name", ["t5-tiny", "t5.1.1-tiny"])
def test_scanned_matches_unscanned(tiny, name):
  cfg, params = tiny[name]
  ids, dec = batch(cfg)
  ref = forward(cfg)({"params": params}, ids, dec)
  out = forward(dataclasses.replace(cfg, scan_layers=True))({"params": layer_stack.stack_layers(params, cfg)}, ids, dec)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _loss(params, cfg, ids, dec):
  return jnp.mean(T5(cfg).apply({"params": params}, ids, dec) ** 2)


_loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.mark.parametrize("policy,scan", [("full", False), ("dots", True)])
def test_remat_gives_identical_logits_and_grads(tiny, policy, scan):
  cfg, params = tiny["t5.1.1-tiny"]
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  params = layer_stack.stack_layers(params, cfg) if scan else params
  ids, dec = batch(cfg)
  remat = dataclasses.replace(cfg, remat_policy=policy)
  assert "remat" in str(jax.make_jaxpr(jax.grad(_loss), static_argnums=1)(params, remat, ids, dec))
  ref_loss, ref_grads = _loss_and_grad(params, cfg, ids, dec)
  out_loss, out_grads = _loss_and_grad(params, remat, ids, dec)
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), out_grads, ref_grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))


@pytest.mark.parametrize("name,scan", [("t5-tiny", False), ("t5.1.1-tiny", False), ("t5.1.1-tiny", True)])
def test_cached_decoding_matches_full_forward(tiny, name, scan):
  cfg, params = tiny[name]
  if scan:
    cfg, params = dataclasses.replace(cfg, scan_layers=True), layer_stack.stack_layers(params, cfg)
  model = T5(cfg)
  ids, dec = batch(cfg, enc_lens=(7, 4), dec_len=6)
  mask = ids != 0
  full = forward(model.config)({"params": params}, ids, dec)
  encoded = model.apply({"params": params}, ids, mask, method=T5.encode)
  cache = init_cache(cfg, params, encoded, mask, max_decode_len=8)  # longer than used: empty slots stay masked

  @jax.jit
  def step(cache, token):
    logits, mut = model.apply(
      {"params": params, "cache": cache}, encoded, mask, token, decode=True, method=T5.decode, mutable=["cache"]
    )
    return logits, mut["cache"]

  steps = []
  for t in range(dec.shape[1]):
    logits, cache = step(cache, dec[:, t : t + 1])
    steps.append(logits[:, 0])
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Masking.


def test_encoder_padding_does_not_change_logits(tiny):
  cfg, params = tiny["t5.1.1-tiny"]
  model = T5(cfg)
  ids, dec = batch(cfg, enc_lens=(5,))
  padded = jnp.pad(ids, ((0, 0), (0, 4)))
  ref = forward(model.config)({"params": params}, ids, dec, attention_mask=jnp.ones_like(ids))
  out = forward(model.config)({"params": params}, padded, dec, attention_mask=(padded != 0))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  # Without the mask the padding is attended to, so the test above can fail.
  unmasked = forward(model.config)({"params": params}, padded, dec, attention_mask=jnp.ones_like(padded))
  assert np.abs(np.asarray(unmasked - ref)).max() > 1e-3


def test_decoder_is_causal_and_honours_its_padding_mask(tiny):
  cfg, params = tiny["t5-tiny"]
  model = T5(cfg)
  ids, dec = batch(cfg)
  ref = forward(model.config)({"params": params}, ids, dec)
  changed = dec.at[:, 3].set((dec[:, 3] + 1) % cfg.vocab_size)
  out = forward(model.config)({"params": params}, ids, changed)
  np.testing.assert_allclose(out[:, :3], ref[:, :3], atol=1e-6)
  assert np.abs(np.asarray(out[:, 3:] - ref[:, 3:])).max() > 1e-4
  # Masking key 1 in the decoder changes every later position but not position 0.
  dmask = jnp.ones_like(dec).at[:, 1].set(0)
  masked = forward(model.config)({"params": params}, ids, dec, decoder_attention_mask=dmask)
  np.testing.assert_allclose(masked[:, 0], ref[:, 0], atol=1e-6)
  assert np.abs(np.asarray(masked[:, 2:] - ref[:, 2:])).max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# T5's particulars.


def test_tied_head_scales_by_d_model_and_untied_does_not(tiny):
  for name in ("t5-tiny", "t5.1.1-tiny"):
    cfg, params = tiny[name]
    model = T5(cfg)
    ids, dec = batch(cfg)
    logits = forward(model.config)({"params": params}, ids, dec)

    def hidden(m, ids, dec):
      encoded = m.encode(ids)
      return m.decoder(m.shared_embedding(dec), encoded, ids != 0)

    h = forward(model.config)({"params": params}, ids, dec, method=hidden)
    if cfg.tie_word_embeddings:
      expected = (h * cfg.d_model**-0.5) @ params["shared_embedding"]["embedding"].T
    else:
      expected = h @ params["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_init_scales_follow_mesh_tf(tiny):
  # No 1/sqrt(d_kv) on the logits, so it must be in the query init: std (d_model * d_kv)**-0.5.
  cfg = make_config("t5-small", vocab_size=512, num_encoder_layers=1, num_decoder_layers=1)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  layer = params["encoder"]["layers_0"]
  for kernel, std in [
    (layer["attention"]["query"]["kernel"], (512 * 64) ** -0.5),
    (layer["attention"]["key"]["kernel"], 512**-0.5),
    (layer["attention"]["out"]["kernel"], 512**-0.5),
    (layer["mlp"]["wo"]["kernel"], 2048**-0.5),
    (params["shared_embedding"]["embedding"], 1.0),
  ]:
    assert abs(float(jnp.std(kernel)) / std - 1) < 0.05


# ---------------------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_uses_the_dropout_rng(tiny):
  cfg, params = tiny["t5.1.1-tiny"]
  model = T5(dataclasses.replace(cfg, dropout_rate=0.1))
  ids, dec = batch(cfg)
  run = lambda seed: forward(model.config)(
    {"params": params}, ids, dec, deterministic=False, rngs={"dropout": jax.random.key(seed)}
  )
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 1e-3
  det = forward(model.config)({"params": params}, ids, dec)
  np.testing.assert_allclose(det, forward(cfg)({"params": params}, ids, dec), atol=1e-6)
  assert np.abs(np.asarray(a - det)).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Packed examples (segment ids and positions).


@pytest.mark.parametrize("name,scan", [("t5-tiny", False), ("t5.1.1-tiny", True)])
def test_packed_examples_get_their_unpacked_logits(tiny, name, scan):
  cfg, params = tiny[name]
  if scan:
    cfg, params = dataclasses.replace(cfg, scan_layers=True), layer_stack.stack_layers(params, cfg)
  rng = np.random.default_rng(0)
  enc_lens, dec_lens = (5, 9, 3), (4, 2, 6)
  examples = [
    (rng.integers(3, cfg.vocab_size, e), rng.integers(3, cfg.vocab_size, d))
    for e, d in zip(enc_lens, dec_lens, strict=True)
  ]

  def pack(parts, width):  # one row: the parts back to back, then padding (segment 0)
    ids, seg = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    start = 0
    for k, part in enumerate(parts, 1):
      ids[0, start : start + len(part)], seg[0, start : start + len(part)] = part, k
      start += len(part)
    return jnp.asarray(ids), jnp.asarray(seg)

  ids, enc_seg = pack([e for e, _ in examples], 20)
  dec, dec_seg = pack([d for _, d in examples], 14)
  starts = np.cumsum((0,) + dec_lens)
  packed = T5(cfg).apply({"params": params}, ids, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
  # Explicit positions give the same as positions derived from the segment ids.
  positions = lambda seg: jnp.asarray(
    np.concatenate(
      [np.arange(n) for n in np.bincount(np.asarray(seg)[0])[1:]] + [np.zeros(int((np.asarray(seg) == 0).sum()))]
    )[None],
    jnp.int32,
  )
  explicit = T5(cfg).apply(
    {"params": params},
    ids,
    dec,
    encoder_segment_ids=enc_seg,
    decoder_segment_ids=dec_seg,
    encoder_positions=positions(enc_seg),
    decoder_positions=positions(dec_seg),
  )
  np.testing.assert_allclose(explicit, packed, atol=1e-6)
  for k, (enc, d) in enumerate(examples):
    alone = forward(cfg)({"params": params}, jnp.asarray(enc[None], jnp.int32), jnp.asarray(d[None], jnp.int32))
    np.testing.assert_allclose(packed[0, starts[k] : starts[k + 1]], alone[0], atol=1e-5, rtol=1e-5)
  # Without segment ids the examples see each other: the check above is not vacuous.
  mixed = forward(cfg)({"params": params}, ids, dec)
  assert np.abs(np.asarray(mixed[0, starts[1] : starts[2]]) - np.asarray(packed[0, starts[1] : starts[2]])).max() > 1e-3


def test_packing_needs_both_segment_ids(tiny):
  cfg, params = tiny["t5-tiny"]
  ids, dec = batch(cfg)
  with pytest.raises(ValueError, match="both decoder and encoder segment ids"):
    T5(cfg).apply({"params": params}, ids, dec, decoder_segment_ids=jnp.ones_like(dec))

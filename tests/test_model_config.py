"""T5's particulars that need no model: relative-position buckets and their bias rows, the gated-GELU MLP,
the presets' parameter counts against the published ones, and one-line config errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5jax.model import T5Config, count_params, get_preset, init_params
from t5jax.model.layers import MLP, RelativePositionBias, relative_position_bucket


@pytest.mark.parametrize(
  "rel,expected",
  [
    (0, 0),
    (-1, 1),
    (-7, 7),
    (1, 17),
    (7, 23),  # exact range: 8 per direction
    (-8, 8),
    (-15, 9),
    (-16, 10),
    (-32, 12),
    (-64, 14),
    (-127, 15),
    (-128, 15),
    (-1000, 15),
    (8, 24),
    (128, 31),
    (5000, 31),  # keys after the query: the upper 16
  ],
)
def test_bidirectional_buckets(rel, expected):
  # 32 buckets, 16 per sign; n = |k - q|; n < 8 exact, else 8 + floor(log(n/8) / log(128/8) * 8), max 15.
  assert relative_position_bucket(rel, bidirectional=True) == expected


@pytest.mark.parametrize(
  "rel,expected",
  [(5, 0), (0, 0), (-1, 1), (-15, 15), (-16, 16), (-32, 21), (-64, 26), (-127, 31), (-128, 31), (-500, 31)],
)
def test_causal_buckets(rel, expected):
  # All 32 buckets look back; n < 16 exact, else 16 + floor(log(n/16) / log(128/16) * 16), max 31.
  assert relative_position_bucket(rel, bidirectional=False) == expected
  if rel >= 16:
    assert expected == 16 + math.floor(math.log(-rel / 16) / math.log(8) * 16)


def test_relative_position_bias_with_offset_matches_static_rows():
  module = RelativePositionBias(32, 128, num_heads=3, bidirectional=False, init_std=1.0)
  variables = module.init(jax.random.key(0), 4, 4)
  full = module.apply(variables, 20, 20)
  assert full.shape == (1, 3, 20, 20)
  for offset in (0, 7, 19):
    row = jax.jit(lambda o: module.apply(variables, 1, 20, query_offset=o))(offset)
    np.testing.assert_array_equal(row, full[:, :, offset : offset + 1])


def test_gated_gelu_is_the_tanh_approximation():
  mlp = MLP(d_ff=8, feed_forward_proj="gated-gelu")
  x = jax.random.normal(jax.random.key(0), (1, 3, 4)) * 3
  variables = nn.meta.unbox(mlp.init(jax.random.key(1), x))
  p = variables["params"]
  a, b = x @ p["wi_0"]["kernel"], x @ p["wi_1"]["kernel"]
  gelu_new = 0.5 * a * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
  np.testing.assert_allclose(mlp.apply(variables, x), (gelu_new * b) @ p["wo"]["kernel"], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Presets and config.


@pytest.mark.parametrize(
  "name,published",
  [
    ("t5-small", 60.5e6),
    ("t5-base", 222.9e6),
    ("t5.1.1-small", 76.96e6),
    ("t5.1.1-base", 247.6e6),
    ("flan-t5-base", 247.6e6),
    ("mt5-small", 300.2e6),
    ("byt5-small", 299.6e6),
    ("t5-11b", 11.3e9),
  ],
)
def test_param_counts_match_published(name, published):
  assert abs(count_params(T5Config.from_dict(get_preset(name))) / published - 1) < 0.01


def test_presets_are_complete_configs():
  for name in ("t5-3b", "mt5-xxl", "byt5-xl", "flan-t5-xxl"):
    cfg = T5Config.from_dict(get_preset(name)).validate()
    assert cfg.to_dict() == get_preset(name)
  assert (
    T5Config.from_dict(get_preset("byt5-small")).num_encoder_layers
    == 3 * T5Config.from_dict(get_preset("byt5-small")).num_decoder_layers
  )
  with pytest.raises(ValueError, match="t5-tiny"):
    get_preset("t5-gigantic")


def test_config_errors_are_one_line_and_name_the_culprit():
  with pytest.raises(ValueError, match="num_layerz") as err:
    T5Config.from_dict({"num_layerz": 3})
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="gated-swish") as err:
    T5Config(feed_forward_proj="gated-swish").validate()
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="float16"):
    T5Config(dtype="float16").validate()
  with pytest.raises(ValueError, match="gated-swish"):  # the model validates before building
    init_params(T5Config(feed_forward_proj="gated-swish"), jax.random.key(0))

"""The T5 model: config, presets, the Linen module, and helpers to build its params.

from t5jax.model import T5, T5Config, get_preset, init_params
config = T5Config.from_dict(get_preset("t5.1.1-small"))
params = init_params(config, jax.random.key(0))
logits = T5(config).apply({"params": params}, input_ids, decoder_input_ids)
"""

from t5jax.model.config import T5Config
from t5jax.model.presets import PRESETS, get_preset
from t5jax.model.params import count_params, init_params, module_for, param_axes, param_shapes
from t5jax.model.t5 import T5

__all__ = [
  "T5",
  "T5Config",
  "PRESETS",
  "get_preset",
  "count_params",
  "init_params",
  "module_for",
  "param_axes",
  "param_shapes",
]

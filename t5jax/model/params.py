"""A model's variables from its config alone: fresh params, their shapes and logical axes, with no allocation.

`module_for` is the one place that picks the module for a config (VideoT5 when it has a video group, else T5).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5jax.model.t5 import T5
from t5jax.model.video import VideoT5


def module_for(config, **options):
  """The module of a T5Config: VideoT5 when it has a video front end, else T5. `options`: VideoT5's augment."""
  return VideoT5(config, **options) if config.video is not None else T5(config)


def _boxed_variables(config, rng, batch=1, enc_len=8, dec_len=8):
  module = module_for(config)
  return module.init(rng, *module.example_inputs(batch, enc_len, dec_len))


def init_params(config, rng, batch=1, enc_len=8, dec_len=8):
  """Fresh float32 params as a plain pytree (logical-axis boxes removed)."""
  return nn.meta.unbox(_boxed_variables(config, rng, batch, enc_len, dec_len)["params"])


def _abstract_variables(config):
  # The config is closed over: as an argument eval_shape would treat it as an array leaf. The key is
  # abstract too: nothing concrete may be created under a mesh of devices this process does not have.
  return jax.eval_shape(lambda rng: _boxed_variables(config, rng), jax.ShapeDtypeStruct((2,), jnp.uint32))


def param_shapes(config):
  """The params' ShapeDtypeStructs, with no allocation."""
  # Strip the logical-axis boxes by hand: `nn.meta.unbox` would add sharding constraints, which fail on
  # abstract values once a mesh is active (in train.py and plan.py).
  return jax.tree.map(
    lambda x: x.value, _abstract_variables(config)["params"], is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
  )


def param_axes(config):
  """A pytree shaped like the params holding each one's logical PartitionSpec, e.g. P('embed', 'mlp')."""
  return nn.get_partition_spec(_abstract_variables(config))["params"]


def count_params(config):
  """Number of parameters, from shapes only (works for t5-11b on a laptop)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(config)))

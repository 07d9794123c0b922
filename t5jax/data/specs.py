"""Element specs of text batches: the name, shape and dtype of every feature, from the config alone.

The datasets of `pretraining.py` and `mixtures.py` produce exactly these (tests/test_data_pipeline.py checks it),
so the run setup and the planner can trace and compile the train step without reading any data. Other input
kinds give their own (t5jax/seams.py).
"""

import numpy as np

from t5jax.data.packing import PACKED_FEATURES
from t5jax.data.denoisers import denoisers_from_config, mixture_lengths
from t5jax.data.span_corruption import compute_input_and_target_lengths

FEATURES = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")


def targets_length(data_config):
  """Decoder length: derived from the input length for span corruption (568 -> 512 / 114) and UL2, set for tasks."""
  if data_config.kind == "span_corruption":
    c = data_config.corruption
    return compute_input_and_target_lengths(data_config.inputs_length, c.noise_density, c.mean_noise_span_length)[1]
  if data_config.kind in ("ul2", "prefix_lm"):  # the longest denoiser's targets (denoisers.py)
    return mixture_lengths(denoisers_from_config(data_config), data_config.inputs_length)[1]
  return data_config.targets_length


def text_spec(config, rows, prefix=""):
  """{feature: (shape, dtype)} of a batch of `rows` token rows that `config.data` yields, each name after
  `prefix` (a second tokenization of the same examples rides along under its own prefix)."""
  d = config.data
  lengths = {"encoder": d.inputs_length, "decoder": targets_length(d)}
  packed = d.kind == "tasks" and d.packing.enabled
  names = FEATURES + (PACKED_FEATURES if packed else ())
  return {prefix + name: ((rows, lengths[name.split("_")[0]]), np.dtype(np.int32)) for name in names}

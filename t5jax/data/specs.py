"""Element specs: the name, shape and dtype of every feature of a global batch, from the config alone.

The datasets of `pretraining.py`, `mixtures.py` and `video_dataset.py` produce exactly these (tests/test_data_pipeline.py checks
it), so the run setup and the planner can trace and compile the train step without reading any data.
"""

import numpy as np

from t5jax.data.packing import PACKED_FEATURES
from t5jax.data.span_corruption import compute_input_and_target_lengths
from t5jax.data.video_dataset import frame_shape

FEATURES = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")
KINDS = ("span_corruption", "tasks", "video")
VIDEO_FEATURES = ("frames",) + FEATURES[1:]  # uint8 clips in place of encoder tokens
# A distilling run whose teacher has its own tokenizer (t5jax/distill.py) also carries the teacher's tokenization
# of every example, one example per row and padded to the same lengths.
TEACHER_PREFIX = "teacher_"
TEACHER_FEATURES = tuple(TEACHER_PREFIX + name for name in FEATURES)


def targets_length(data_config):
  """Decoder length: derived from the input length for span corruption (568 -> 512 / 114), set for tasks."""
  if data_config.kind == "span_corruption":
    c = data_config.corruption
    return compute_input_and_target_lengths(data_config.inputs_length, c.noise_density, c.mean_noise_span_length)[1]
  return data_config.targets_length


def batch_spec(config, rows=None):
  """{feature: (shape, dtype)} of a batch of `rows` (default: the global batch) that `config.data` yields."""
  d = config.data
  if d.kind not in KINDS:
    raise ValueError(f"config.data.kind={d.kind!r} is unknown; choose one of {KINDS}")
  rows = config.batch_size if rows is None else rows
  if d.kind == "video":
    decoder = ((rows, d.targets_length), np.dtype(np.int32))
    spec = {
      "frames": ((rows,) + frame_shape(d.video), np.dtype(np.uint8)),
      "frame_mask": ((rows, d.video.num_frames), np.dtype(np.bool_)),
      **{name: decoder for name in VIDEO_FEATURES[1:]},
    }
    if d.video.get("prefix"):
      spec["prefix_tokens"] = ((rows, d.video.prefix_length), np.dtype(np.int32))
    return spec
  lengths = {"encoder": d.inputs_length, "decoder": targets_length(d)}
  names = FEATURES + (PACKED_FEATURES if d.kind == "tasks" and d.packing.enabled else ())
  names += TEACHER_FEATURES if teacher_tokenizer(config) else ()
  return {
    name: ((rows, lengths[name.removeprefix(TEACHER_PREFIX).split("_")[0]]), np.dtype(np.int32)) for name in names
  }


def teacher_tokenizer(config):
  """The teacher's own SentencePiece model when a distilling run names one (`config.distill`), else None."""
  d = config.get("distill")
  return d.teacher_tokenizer if d is not None and d.loss != "none" else None

"""Turns tokenized examples into fixed-shape rows: padded one example per row, or packed several per row.

Packed rows carry T5X's extra features: `*_segment_ids` (0 = padding, 1..k = the k-th example of the row)
and `*_positions` (restarting at 0 for each example), on both encoder and decoder, so the model can keep
attention inside an example and give each example its own relative positions. Packing is first-fit over
the examples in the order given, which keeps it deterministic for a deterministic input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Example = tuple[np.ndarray, np.ndarray]  # (inputs, targets) int32 token ids, each already ending in EOS
PACKED_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


def _shift_right(targets: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
  """Teacher forcing inputs: targets moved one step right with 0 (T5's start token) in front; when packed,
  every example starts again from 0 rather than from the previous example's last token."""
  shifted = np.zeros_like(targets)
  shifted[:, 1:] = targets[:, :-1]
  if segment_ids is not None:
    starts = np.zeros_like(segment_ids, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts[:, 0] = True
    shifted[starts] = 0
  return shifted


def pad_examples(examples: Sequence[Example], inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
  """One example per row, zero padded: [len(examples), inputs_length] and [..., targets_length]."""
  inputs = np.zeros((len(examples), inputs_length), np.int32)
  targets = np.zeros((len(examples), targets_length), np.int32)
  for row, (x, y) in enumerate(examples):
    inputs[row, : len(x)] = x
    targets[row, : len(y)] = y
  return {
    "encoder_input_tokens": inputs,
    "decoder_target_tokens": targets,
    "decoder_input_tokens": _shift_right(targets),
    "decoder_loss_weights": (targets != 0).astype(np.int32),
  }


def pack_examples(
  examples: Sequence[Example], rows: int, inputs_length: int, targets_length: int
) -> tuple[dict[str, np.ndarray], int]:
  """First-fit packing of `examples` into `rows` rows; returns (features, number of examples that did not fit).

  Each example goes into the first row with room for both its inputs and its targets; an example that fits
  nowhere is dropped (and counted), so the caller sizes its pool of examples to fill the rows.
  """
  enc_used = np.zeros(rows, np.int64)
  dec_used = np.zeros(rows, np.int64)
  count = np.zeros(rows, np.int64)
  placed = []  # (row, enc offset, dec offset, segment id, example)
  dropped = 0
  for x, y in examples:
    fits = (enc_used + len(x) <= inputs_length) & (dec_used + len(y) <= targets_length)
    if not fits.any():
      dropped += 1
      continue
    row = int(fits.argmax())
    count[row] += 1
    placed.append((row, int(enc_used[row]), int(dec_used[row]), int(count[row]), x, y))
    enc_used[row] += len(x)
    dec_used[row] += len(y)
  out = {
    name: np.zeros((rows, length), np.int32)
    for name, length in (
      ("encoder_input_tokens", inputs_length),
      ("encoder_segment_ids", inputs_length),
      ("encoder_positions", inputs_length),
      ("decoder_target_tokens", targets_length),
      ("decoder_segment_ids", targets_length),
      ("decoder_positions", targets_length),
    )
  }
  for row, e, d, seg, x, y in placed:
    out["encoder_input_tokens"][row, e : e + len(x)] = x
    out["encoder_segment_ids"][row, e : e + len(x)] = seg
    out["encoder_positions"][row, e : e + len(x)] = np.arange(len(x))
    out["decoder_target_tokens"][row, d : d + len(y)] = y
    out["decoder_segment_ids"][row, d : d + len(y)] = seg
    out["decoder_positions"][row, d : d + len(y)] = np.arange(len(y))
  targets = out["decoder_target_tokens"]
  features = {
    "encoder_input_tokens": out["encoder_input_tokens"],
    "decoder_target_tokens": targets,
    "decoder_input_tokens": _shift_right(targets, out["decoder_segment_ids"]),
    "decoder_loss_weights": (out["decoder_segment_ids"] > 0).astype(np.int32),
    **{k: out[k] for k in PACKED_FEATURES},
  }
  return features, dropped

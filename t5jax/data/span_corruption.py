"""T5's span-corruption objective in numpy, vectorized over a batch and deterministic for a given rng.

A row of raw tokens has ~15% of its tokens chosen as noise, in spans of mean length 3. Inputs keep the
non-noise tokens and replace each noise span by one sentinel; targets list, for each span, its sentinel
followed by the span's tokens. Sentinels count down from `vocab_size - 1` (`<extra_id_0>`, `<extra_id_1>`, ...),
and both sequences end in EOS. Every row of a batch has the same number of noise tokens and spans, so every
output row has the same length and the whole batch is a few array operations with no per-row loop.

Example (raw length 568): 85 noise tokens in 28 spans -> inputs 483 + 28 + 1 EOS = 512,
targets 85 + 28 + 1 EOS = 114.
"""

from __future__ import annotations

import numpy as np


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a row of `length` tokens, by T5's rounding.

  Python's round (half to even) matches the rounding T5 uses. The clamps only matter for tiny lengths:
  at least one noise and one non-noise token, and no more spans than either kind of token can fill
  (T5 itself only enforces `num_spans >= 1`; the upper clamp keeps every segment non-empty).
  """
  if length < 2:
    raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  num_spans = min(num_spans, num_noise, length - num_noise)
  return num_noise, num_spans


def _corrupted_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float):
  num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
  # Inputs: non-noise tokens + one sentinel per span + EOS. Targets: noise tokens + sentinels + EOS.
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(
  inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
  """(tokens_length, targets_length): the raw length to cut text into so inputs fit `inputs_length`.

  Span corruption shortens a row (each span collapses to one sentinel), so raw chunks must be longer than
  the encoder length for the encoder not to see padding: 568 raw tokens -> 512 inputs / 114 targets.
  """
  tokens_length = inputs_length - 1
  while _corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = _corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
  # T5's adjustment: at density 0.5 the targets could come out one token longer than the inputs; drop a
  # raw token so they are not (keeps encoder and decoder lengths equal, as in T5's own runs).
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segment_lengths(num_items: int, num_segments: int, rng: np.random.Generator, batch: int):
  """int[batch, num_segments]: for each row, a uniformly random split of `num_items` into non-empty parts.

  A split is a random subset of `num_segments - 1` of the `num_items - 1` gaps between items. The
  `num_segments - 1` smallest of iid uniform keys pick such a subset (argpartition: no full sort).
  """
  if num_segments == 1:
    return np.full((batch, 1), num_items, dtype=np.int64)
  keys = rng.random((batch, num_items - 1))
  cuts = np.sort(np.argpartition(keys, num_segments - 2, axis=1)[:, : num_segments - 1], axis=1) + 1
  bounds = np.concatenate([np.zeros((batch, 1), np.int64), cuts, np.full((batch, 1), num_items, np.int64)], axis=1)
  return np.diff(bounds, axis=1)


def random_spans_noise_mask(
  length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator, batch: int = 1
) -> np.ndarray:
  """bool[batch, length]: True at noise tokens, T5's way.

  Each row has exactly `noise_counts(...)` noise tokens and spans. Noise and non-noise tokens are each cut
  into `num_spans` random non-empty segments, which alternate starting with non-noise (so a row always
  ends in a noise span and every noise span is preceded by non-noise text).
  """
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  nonnoise_lengths = _random_segment_lengths(length - num_noise, num_spans, rng, batch)
  noise_lengths = _random_segment_lengths(num_noise, num_spans, rng, batch)
  run_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=2).reshape(-1)  # [batch * 2 * spans]
  # Each row's runs sum to `length`, so expanding the alternating pattern by the run lengths of all rows at
  # once yields exactly batch * length flags in row order.
  pattern = np.tile(np.array([False, True]), batch * num_spans)
  return np.repeat(pattern, run_lengths).reshape(batch, length)


def _collapse_spans(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
  """Replaces each run of True in `mask` by one sentinel (the k-th run gets vocab_size - 1 - k) and keeps
  the False tokens; every row must have the same number of kept positions."""
  prev = np.zeros_like(mask)
  prev[:, 1:] = mask[:, :-1]
  span_start = mask & ~prev
  sentinels = vocab_size - np.cumsum(span_start, axis=1)  # k-th start (1-based count) -> vocab - k
  values = np.where(span_start, sentinels, tokens)
  keep = ~mask | span_start
  # Boolean indexing flattens in row order; equal kept counts per row make the reshape exact.
  return values[keep].reshape(tokens.shape[0], -1)


def apply_noise_mask(
  tokens: np.ndarray, noise_mask: np.ndarray, *, vocab_size: int, eos_id: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 for `tokens` [batch, length] and a mask from `random_spans_noise_mask`."""
  if tokens.shape != noise_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} differ in shape")
  tokens = tokens.astype(np.int32, copy=False)
  # Targets are the mirror image: collapsing the *non-noise* runs puts sentinel k right before noise span
  # k (the mask starts with non-noise), so both sides number their spans the same way.
  inputs = _collapse_spans(tokens, noise_mask, vocab_size)
  targets = _collapse_spans(tokens, ~noise_mask, vocab_size)
  eos = np.full((tokens.shape[0], 1), eos_id, dtype=np.int32)
  return (
    np.concatenate([inputs, eos], axis=1).astype(np.int32, copy=False),
    np.concatenate([targets, eos], axis=1).astype(np.int32, copy=False),
  )


def span_corruption(
  tokens: np.ndarray,
  rng: np.random.Generator,
  *,
  vocab_size: int,
  eos_id: int = 1,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Span-corrupts a batch of raw token rows.

  Args:
    tokens: int[batch, tokens_length] raw token ids (no EOS, no padding; ids below the sentinel range).
    rng: the only source of randomness: equal rng state and tokens give equal outputs.
    vocab_size: tokenizer vocabulary size including extra ids; sentinels are vocab_size-1, -2, ...

  Returns:
    inputs int32[batch, inputs_length] and targets int32[batch, targets_length], lengths as given by
    `compute_input_and_target_lengths` (568 raw -> 512 / 114), each ending in EOS, with no padding.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  mask = random_spans_noise_mask(tokens.shape[1], noise_density, mean_noise_span_length, rng, tokens.shape[0])
  return apply_noise_mask(tokens, mask, vocab_size=vocab_size, eos_id=eos_id)

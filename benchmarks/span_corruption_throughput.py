r"""Span corruption examples/s: ours (vectorized over the batch) vs the per-example numpy algorithm of
transformers' run_t5_mlm_flax.py collator, re-implemented here from its description; then UL2's mixture of
denoisers (configs/ul2.py's seven, t5jax/data/denoisers.py) at 128 and 512 encoder tokens.

  python benchmarks/span_corruption_throughput.py [--batch 256] [--repeats 5]

Both turn 568 raw tokens into 512 inputs / 114 targets (density 0.15, mean span 3). The mixture's rate is to
be held against what configs/ul2.py's train step consumes (its log's tok/s over 128 + 127 tokens a row).
"""

import argparse
import time

import numpy as np

from t5jax.data import denoisers
from t5jax.data.span_corruption import span_corruption

VOCAB = 32100


# ---- The peer: per-example Python loop over a noise mask, then sentinel filling (HF's collator shape).
def hf_random_spans_noise_mask(length, noise_density=0.15, mean_noise_span_length=3.0):
  num_noise_tokens = int(np.round(length * noise_density))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = int(np.round(num_noise_tokens / mean_noise_span_length))
  num_noise_spans = max(num_noise_spans, 1)
  num_nonnoise_tokens = length - num_noise_tokens

  def random_segmentation(num_items, num_segments):
    mask_indices = np.arange(num_items - 1) < (num_segments - 1)
    np.random.shuffle(mask_indices)
    first_in_segment = np.pad(mask_indices, [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    _, segment_length = np.unique(segment_id, return_counts=True)
    return segment_length

  noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
  nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
  interleaved = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
  span_starts = np.cumsum(interleaved)[:-1]
  span_start_indicator = np.zeros((length,), dtype=np.int8)
  span_start_indicator[span_starts] = True
  span_num = np.cumsum(span_start_indicator)
  is_noise = np.equal(span_num % 2, 1)
  return is_noise[:length]


def hf_create_sentinel_ids(mask_indices):
  start_indices = mask_indices - np.roll(mask_indices, 1, axis=-1) * mask_indices
  start_indices[:, 0] = mask_indices[:, 0]
  sentinel_ids = np.where(start_indices != 0, np.cumsum(start_indices, axis=-1), start_indices)
  sentinel_ids = np.where(sentinel_ids != 0, (VOCAB - sentinel_ids), 0)
  sentinel_ids -= mask_indices - start_indices
  return sentinel_ids


def hf_filter_input_ids(input_ids, sentinel_ids):
  batch_size = input_ids.shape[0]
  input_ids_full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
  input_ids = input_ids_full[input_ids_full >= 0].reshape((batch_size, -1))
  return np.concatenate([input_ids, np.full((batch_size, 1), 1, dtype=np.int32)], axis=-1)


def hf_collate(tokens):
  batch, length = tokens.shape
  mask = np.asarray([hf_random_spans_noise_mask(length) for _ in range(batch)])
  labels_mask = ~mask
  inputs = hf_filter_input_ids(tokens, hf_create_sentinel_ids(mask.astype(np.int8)))
  targets = hf_filter_input_ids(tokens, hf_create_sentinel_ids(labels_mask.astype(np.int8)))
  return inputs, targets


def best_rate(fn, tokens, repeats):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(tokens)
    best = min(best, time.perf_counter() - start)
  return len(tokens) / best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  tokens = np.random.default_rng(0).integers(3, 32000, (args.batch, 568)).astype(np.int32)
  rng = np.random.default_rng(0)
  ours = best_rate(lambda t: span_corruption(t, rng, vocab_size=VOCAB), tokens, args.repeats)
  peer = best_rate(hf_collate, tokens, args.repeats)
  i, t = span_corruption(tokens, rng, vocab_size=VOCAB)
  hi, ht = hf_collate(tokens)
  assert i.shape == hi.shape == (args.batch, 512) and t.shape == ht.shape == (args.batch, 114)
  print(f"span corruption, 568 -> 512/114 tokens, batch {args.batch}, best of {args.repeats}:")
  print(f"  t5jax (vectorized):          {ours:12,.0f} examples/s")
  print(f"  HF collator algorithm (loop): {peer:12,.0f} examples/s")
  print(f"  speedup: {ours / peer:.1f}x")
  mixture = tuple(denoisers.Denoiser(name, *spec) for name, spec in denoisers.UL2_DENOISERS.items())
  for inputs_length in (128, 512):
    chunk_length, targets_length = denoisers.mixture_lengths(mixture, inputs_length)
    step = denoisers.MixtureStep(
      None,
      mixture,
      {m: i for i, m in enumerate(denoisers.MODE_TOKENS, 3)},
      seed=0,
      vocab_size=VOCAB,
      eos_id=1,
      inputs_length=inputs_length,
      shard_index=0,
      shard_count=1,
    )
    rows = np.random.default_rng(0).integers(3, 31000, (args.batch, chunk_length)).astype(np.int32)
    rate = best_rate(lambda t, step=step: step.denoise(t, rng), rows, args.repeats)
    print(f"UL2 mixture, {chunk_length} raw -> {inputs_length}/{targets_length} tokens: {rate:12,.0f} examples/s")


if __name__ == "__main__":
  main()

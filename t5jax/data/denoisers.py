"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", Section 3.1) as
batches: R- and X-denoisers are span corruption (span_corruption.py) at other (mean span, density), the
S-denoiser is prefix LM, and each example's inputs start with its mode token.

The paper's final mixture (Section 3.1.2), with the mode tokens of Section 3.1.3:
  R  [NLU]  (mu 3, r 0.15)  (mu 8, r 0.15)
  X  [NLG]  (mu 3, r 0.5)   (mu 8, r 0.5)   (mu 64, r 0.15)   (mu 64, r 0.5)
  S  [S2S]  prefix LM, the continuation a share r = 0.25 of the example on average
S-denoisers make 20% of examples and the six R/X-denoisers share the rest equally (`UL2_DENOISERS`). Every row
of a batch draws its denoiser from (seed, step, index), so `ds[step]` stays a pure function of the step.

Fixed shapes for a mixed batch: each span denoiser gets its own raw length, computed as T5 computes span
corruption's (568 -> 512), so that mode token + inputs fill `inputs_length` exactly; the targets of every row
are padded to the longest denoiser's (at r = 0.5 about as long as the inputs: 512 -> 512, against span
corruption's 114, so the decoder does ~4x the work per example and an R row is ~80% decoder padding). Text is
cut at the longest raw length and a shorter denoiser reads a random window of its chunk.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

from t5jax.data import pretraining
from t5jax.data.span_corruption import (
  apply_noise_mask,
  compute_input_and_target_lengths,
  noise_counts,
  random_spans_noise_mask,
)

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # R, X, S (the paper's paradigm tokens)
PREFIX_LM = "prefix_lm"
SPAN = "span"
# T5's sentinel budget: the extra ids of its vocabulary (and of every tokenizer the project trains).
SENTINELS = 100
# Salt mixed into the per-step seed, apart from the shuffle's and span corruption's streams.
_SALT = 0x0C2

# name -> (objective, mode token, mean span, noise density r, rate); for prefix LM, r is the continuation's
# mean share of the example. The paper's final configuration (Section 3.1.2).
UL2_DENOISERS = {
  "r_mu3": (SPAN, "[NLU]", 3.0, 0.15, 0.8 / 6),
  "r_mu8": (SPAN, "[NLU]", 8.0, 0.15, 0.8 / 6),
  "x_mu3_r50": (SPAN, "[NLG]", 3.0, 0.5, 0.8 / 6),
  "x_mu8_r50": (SPAN, "[NLG]", 8.0, 0.5, 0.8 / 6),
  "x_mu64_r15": (SPAN, "[NLG]", 64.0, 0.15, 0.8 / 6),
  "x_mu64_r50": (SPAN, "[NLG]", 64.0, 0.5, 0.8 / 6),
  "s": (PREFIX_LM, "[S2S]", 0.0, 0.25, 0.2),
}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  name: str
  objective: str  # SPAN | PREFIX_LM
  mode: str  # token prepended to the inputs; "" for none
  mean_span: float  # mu (span only)
  noise_density: float  # r: span corruption's density, or prefix LM's mean continuation share
  rate: float  # unnormalized mixing rate
  sentinels: int = SENTINELS  # the most spans a row may have: the tokenizer's extra ids

  def lengths(self, inputs_length: int) -> tuple[int, int]:
    """(raw tokens, targets length) for an encoder of `inputs_length` (the mode token included).

    A span denoiser's raw length fills the encoder, unless its spans would then outnumber the SENTINELS: at 512
    encoder tokens (mu 3, r 0.5) would make 127 spans; it reads fewer raw tokens instead, 100 spans, and its
    inputs are padded (by 22% there)."""
    room = inputs_length - (1 if self.mode else 0)
    if self.objective == PREFIX_LM:
      # Prefix + EOS fill the room when the continuation is one token; the continuation is at most
      # ceil(2 r L - 1) tokens (see `prefix_lm`), plus EOS.
      return room, math.ceil(2 * self.noise_density * room - 1) + 1
    raw, targets = compute_input_and_target_lengths(room, self.noise_density, self.mean_span)
    while noise_counts(raw, self.noise_density, self.mean_span)[1] > self.sentinels:
      raw -= 1
      num_noise, num_spans = noise_counts(raw, self.noise_density, self.mean_span)
      targets = num_noise + num_spans + 1
    return raw, targets

  def num_sentinels(self, inputs_length: int) -> int:
    if self.objective == PREFIX_LM:
      return 0
    return noise_counts(self.lengths(inputs_length)[0], self.noise_density, self.mean_span)[1]


def denoisers_from_config(data_config) -> tuple[Denoiser, ...]:
  """The denoisers `config.data` asks for: all of `data.ul2.denoisers` for kind ul2, only its prefix-LM one
  for kind prefix_lm; mode tokens only when `data.ul2.mode_tokens`."""
  ul2 = data_config.ul2
  out = []
  for name, d in ul2.denoisers.items():
    if data_config.kind == PREFIX_LM and d.objective != PREFIX_LM:
      continue
    if d.objective not in (SPAN, PREFIX_LM) or (ul2.mode_tokens and d.mode not in MODE_TOKENS):
      raise ValueError(
        f"config.data.ul2.denoisers.{name}: objective {d.objective!r} / mode {d.mode!r} must be one of "
        f"{(SPAN, PREFIX_LM)} / {MODE_TOKENS}"
      )
    if d.rate < 0 or not 0 < d.noise_density <= (0.5 if d.objective == PREFIX_LM else 0.99):
      raise ValueError(
        f"config.data.ul2.denoisers.{name}: rate {d.rate} or noise_density {d.noise_density} out of range"
      )
    mode = d.mode if ul2.mode_tokens else ""
    rate = 1.0 if data_config.kind == PREFIX_LM else d.rate
    out.append(Denoiser(name, d.objective, mode, d.mean_span, d.noise_density, rate))
  if not out or sum(d.rate for d in out) <= 0:
    raise ValueError(f"config.data.ul2.denoisers gives no denoiser with a positive rate for kind {data_config.kind!r}")
  return tuple(out)


def mixture_lengths(denoisers, inputs_length) -> tuple[int, int]:
  """(chunk length, targets length) of a batch: the longest raw length and the longest targets of the
  denoisers that can be drawn."""
  lengths = [d.lengths(inputs_length) for d in denoisers if d.rate > 0]
  return max(raw for raw, _ in lengths), max(targets for _, targets in lengths)


def prefix_lm(tokens, rng, *, noise_density, eos_id=1):
  """S-denoising of `tokens` int[batch, L]: (inputs [batch, L], targets [batch, ceil(2 r L - 1) + 1]).

  Each row splits at a random point: the inputs are the prefix, the targets the continuation (each then EOS,
  then padding). The continuation has 1 + floor(u (2 r L - 1)) tokens for u uniform in [0, 1): r L on average
  (T5's prefix LM draws the split so that r = 0.5; UL2's S-denoiser asks r = 0.25). Needs r <= 0.5.
  """
  batch, length = tokens.shape
  spread = 2 * noise_density * length - 1
  cont = 1 + np.floor(rng.random(batch) * spread).astype(np.int64)  # continuation lengths, in [1, L - 1]
  prefix = length - cont
  padded = np.concatenate([tokens, np.zeros((batch, 1), tokens.dtype)], axis=1)
  inputs = np.where(np.arange(length) < prefix[:, None], tokens, 0)
  inputs[np.arange(batch), prefix] = eos_id
  width = math.ceil(spread) + 1
  gather = np.minimum(prefix[:, None] + np.arange(width), length)  # index L: the padding column
  targets = np.where(np.arange(width) < cont[:, None], padded[np.arange(batch)[:, None], gather], 0)
  targets[np.arange(batch), cont] = eos_id
  return inputs.astype(np.int32), targets.astype(np.int32)


class MixtureStep:
  """grain map_with_index transform: (step, global chunk indices [batch]) -> this shard's feature dict.

  The whole global batch is made on every host and each keeps its rows, so the rows do not depend on the
  shard count (the shards concatenate to the single-host batch). A class so grain can pickle it.
  """

  def __init__(self, chunks, denoisers, mode_ids, *, seed, vocab_size, eos_id, inputs_length, shard_index, shard_count):
    self.chunks, self.denoisers, self.mode_ids = chunks, tuple(denoisers), dict(mode_ids)
    self.seed, self.vocab_size, self.eos_id, self.inputs_length = seed, vocab_size, eos_id, inputs_length
    self.shard_index, self.shard_count = shard_index, shard_count
    self.targets_length = mixture_lengths(self.denoisers, inputs_length)[1]
    rates = np.array([d.rate for d in self.denoisers], np.float64)
    self.probs = rates / rates.sum()

  def denoise(self, tokens, rng):
    """(inputs, targets, denoiser index per row) for raw rows `tokens` int[batch, chunk length]."""
    batch, chunk_length = tokens.shape
    choice = rng.choice(len(self.denoisers), size=batch, p=self.probs)
    inputs = np.zeros((batch, self.inputs_length), np.int32)
    targets = np.zeros((batch, self.targets_length), np.int32)
    for k, d in enumerate(self.denoisers):
      rows = np.flatnonzero(choice == k)
      if not len(rows):
        continue
      raw, _ = d.lengths(self.inputs_length)
      offsets = rng.integers(0, chunk_length - raw + 1, size=len(rows))  # a random window of the chunk
      window = tokens[rows[:, None], offsets[:, None] + np.arange(raw)]
      if d.objective == PREFIX_LM:
        inp, tgt = prefix_lm(window, rng, noise_density=d.noise_density, eos_id=self.eos_id)
      else:
        mask = random_spans_noise_mask(raw, d.noise_density, d.mean_span, rng, len(rows))
        inp, tgt = apply_noise_mask(window, mask, vocab_size=self.vocab_size, eos_id=self.eos_id)
      if d.mode:
        inp = np.concatenate([np.full((len(rows), 1), self.mode_ids[d.mode], np.int32), inp], axis=1)
      inputs[rows, : inp.shape[1]] = inp
      targets[rows, : tgt.shape[1]] = tgt
    return inputs, targets, choice

  def __call__(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    per_host = len(indices) // self.shard_count
    rows = slice(self.shard_index * per_host, (self.shard_index + 1) * per_host)
    inputs, targets, _ = self.denoise(self.chunks[indices], np.random.default_rng([self.seed, _SALT, step]))
    return pretraining.seq2seq_features(inputs[rows], targets[rows])


def mixture_dataset(chunks, step_fn: MixtureStep, *, batch_size, seed, shuffle=True) -> grain.MapDataset:
  """An infinite, indexable dataset of `step_fn`'s batches over `chunks` (as `span_corruption_dataset`)."""
  ds = grain.MapDataset.range(len(chunks))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat().batch(batch_size, drop_remainder=True).map_with_index(step_fn)


def build_ul2_data(
  data_config, cache_dir, *, batch_size, seed, eval_seed=0, shard_index=0, shard_count=1, **text_options
) -> pretraining.PretrainingData:
  """UL2 (kind ul2) or prefix-LM (kind prefix_lm) batches of `data_config` over the pretraining text
  (`pretraining.token_chunks`; `text_options` say which), as `PretrainingData`."""
  denoisers = denoisers_from_config(data_config)
  inputs_length = data_config.inputs_length
  tokens_length, targets_length = mixture_lengths(denoisers, inputs_length)
  # All three mode tokens, always in this order, whichever denoisers are drawn: their ids stay 3, 4, 5 and
  # ul2 and prefix_lm runs share one tokenizer (continuation training of a UL2 model).
  modes = MODE_TOKENS if any(d.mode for d in denoisers) else ()
  text = pretraining.token_chunks(cache_dir, tokens_length=tokens_length, user_pieces=modes, **text_options)
  tokenizer = text.tokenizer
  spans = max(d.num_sentinels(inputs_length) for d in denoisers)
  if spans > tokenizer.extra_ids:
    raise ValueError(f"{spans} noise spans per row need more sentinels than the tokenizer's {tokenizer.extra_ids}")
  if text.train.max() >= tokenizer.vocab_size - spans:
    raise ValueError(f"token ids reach {text.train.max()}, into the sentinel range of {tokenizer.vocab_size}")
  if not 0 <= seed < 2**32 or batch_size % shard_count:
    raise ValueError(f"seed {seed} must be in [0, 2**32) and batch_size {batch_size} split over {shard_count} hosts")

  def dataset(chunks, seed, shuffle):
    step = MixtureStep(
      chunks,
      denoisers,
      {m: tokenizer.user_pieces[m] for m in modes},
      seed=seed,
      vocab_size=tokenizer.vocab_size,
      eos_id=tokenizer.eos_id,
      inputs_length=inputs_length,
      shard_index=shard_index,
      shard_count=shard_count,
    )
    return mixture_dataset(chunks, step, batch_size=batch_size, seed=seed, shuffle=shuffle)

  return pretraining.PretrainingData(
    tokenizer=tokenizer,
    train=dataset(text.train, seed, True),
    eval=dataset(text.eval, eval_seed, False),  # chunk order and a fixed seed: the same whatever the run's seed
    tokens_length=tokens_length,
    inputs_length=inputs_length,
    targets_length=targets_length,
    num_train_chunks=len(text.train),
    num_eval_chunks=len(text.eval),
    source=text.source,
    skipped={},
    eval_chunks=text.eval,
  )

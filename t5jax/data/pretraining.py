"""Span-corruption pretraining data: text -> tokenizer -> token chunks (cached) -> indexable batches.

`ds[step]` is the batch for training step `step`, a pure function of (data, seed, step, shard): the data
position a checkpoint records is the step, and resuming needs nothing else, with or without loader worker
processes (`loader.iterate_from`). Batches are per-host numpy arrays with T5X feature names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

import grain
import numpy as np

from t5jax.data import sources, tasks as tasks_lib
from t5jax.data.span_corruption import (
  apply_noise_mask,
  compute_input_and_target_lengths,
  noise_counts,
  random_spans_noise_mask,
)
from t5jax.data.tokenizer import Tokenizer, load_or_train_tokenizer

# Salt mixed into the per-step seed so the noise masks are not drawn from the same stream as the shuffle.
_MASK_SALT = 0x5A17


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
  """int32[num_tokens]: documents tokenized (in sentencepiece's thread pool) and concatenated.

  Like T5's C4 span-corruption task, no EOS goes between documents: a chunk may run across a document
  boundary. An EOS inside a chunk would land inside inputs or targets, and a decoder trained to emit EOS
  mid-target learns to stop decoding early.
  """
  ids = tokenizer.encode_batch(documents)
  return np.concatenate([np.asarray(doc, dtype=np.int32) for doc in ids] or [np.zeros(0, np.int32)])


def chunk_stream(stream: np.ndarray, tokens_length: int) -> np.ndarray:
  num_chunks = len(stream) // tokens_length
  return stream[: num_chunks * tokens_length].reshape(num_chunks, tokens_length)


class _SpanCorruptStep:
  """grain map_with_index transform: (step, global chunk indices [batch]) -> this shard's feature dict.

  A class rather than a closure so grain can pickle it into worker processes.
  """

  def __init__(
    self, chunks, *, seed, vocab_size, eos_id, noise_density, mean_noise_span_length, shard_index, shard_count
  ):
    self.chunks = chunks
    self.seed, self.vocab_size, self.eos_id = seed, vocab_size, eos_id
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.shard_index, self.shard_count = shard_index, shard_count

  def __call__(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    global_batch = len(indices)
    per_host = global_batch // self.shard_count
    rows = slice(self.shard_index * per_host, (self.shard_index + 1) * per_host)
    # Every host draws the mask for the whole global batch and keeps its own rows: the masks then do not
    # depend on shard_count, so the shards' batches concatenate to exactly the single-host batch. (Cost:
    # ~2 ms per 256 rows per host, small next to a training step.)
    rng = np.random.default_rng([self.seed, _MASK_SALT, step])
    mask = random_spans_noise_mask(
      self.chunks.shape[1], self.noise_density, self.mean_noise_span_length, rng, global_batch
    )[rows]
    inputs, targets = apply_noise_mask(self.chunks[indices[rows]], mask, vocab_size=self.vocab_size, eos_id=self.eos_id)
    return seq2seq_features(inputs, targets)


def seq2seq_features(inputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
  """A pretraining batch's features from its inputs and targets (padding 0 in the targets is weighted 0)."""
  # Teacher forcing: the decoder sees the targets shifted right, starting from 0 (pad), T5's start token.
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
    "encoder_input_tokens": inputs,
    "decoder_target_tokens": targets,
    "decoder_input_tokens": decoder_inputs,
    "decoder_loss_weights": (targets != 0).astype(np.int32),
  }


def span_corruption_dataset(
  chunks: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  vocab_size: int,
  eos_id: int = 1,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
  shard_index: int = 0,
  shard_count: int = 1,
  shuffle: bool = True,
) -> grain.MapDataset:
  """An infinite, indexable dataset: `ds[step]` is this shard's part of global batch `step`.

  Args:
    chunks: int32[num_chunks, tokens_length] raw token rows (see `chunk_stream`).
    batch_size: the global batch; each of `shard_count` hosts gets rows
      [shard_index * B/shard_count, (shard_index + 1) * B/shard_count) of it.
    seed: fixes the order of chunks (reshuffled every epoch) and every noise mask.
    shuffle: False keeps chunk order (for eval: `ceil(num_chunks / batch_size)` steps cover it once).

  Returns a grain.MapDataset of dicts with int32 arrays: encoder_input_tokens [B/shards, inputs_length],
  decoder_target_tokens, decoder_input_tokens, decoder_loss_weights [B/shards, targets_length].
  """
  chunks = np.asarray(chunks, dtype=np.int32)
  if chunks.ndim != 2 or len(chunks) == 0:
    raise ValueError(f"chunks must be a non-empty [num_chunks, tokens_length] array, got {chunks.shape}")
  if batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(
      f"batch_size {batch_size} must split evenly over {shard_count} shards "
      f"and shard_index {shard_index} be in [0, {shard_count})"
    )
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  _, num_spans = noise_counts(chunks.shape[1], noise_density, mean_noise_span_length)
  if chunks.max() >= vocab_size - num_spans:
    raise ValueError(f"token ids reach {chunks.max()}, into the sentinel range of vocab_size {vocab_size}")
  ds = grain.MapDataset.range(len(chunks))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() then batch(): batches run across epoch boundaries, so every step is a full batch; shuffle
  # reseeds per epoch, so each epoch has a different order.
  ds = ds.repeat().batch(batch_size, drop_remainder=True)
  return ds.map_with_index(
    _SpanCorruptStep(
      chunks,
      seed=seed,
      vocab_size=vocab_size,
      eos_id=eos_id,
      noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length,
      shard_index=shard_index,
      shard_count=shard_count,
    )
  )


@dataclasses.dataclass(frozen=True)
class PretrainingData:
  tokenizer: Tokenizer
  train: grain.MapDataset
  eval: grain.MapDataset
  tokens_length: int  # raw tokens per chunk, e.g. 568
  inputs_length: int  # e.g. 512
  targets_length: int  # e.g. 114
  num_train_chunks: int
  num_eval_chunks: int
  source: str  # where the text came from, in words (recorded in the workdir's config.json)
  skipped: dict  # records left out while reading, by kind: none for text (every dataset has it)
  eval_chunks: np.ndarray | None = None  # the held-out raw token rows (continuation evaluation)


def _md5_files(paths) -> str:
  h = hashlib.md5()
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def _cached_chunks(cache_dir, name, key, tokenizer, docs_fn, tokens_length) -> np.ndarray:
  """Token stream of `docs_fn()` cached as .npy under a key of (text, tokenizer); then chunked."""
  path = os.path.join(cache_dir, "tokens", f"{name}_{key}.npy")
  if not os.path.isfile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stream = token_stream(tokenizer, docs_fn())
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.save would otherwise append ".npy" to the tmp name
      np.save(f, stream)
    os.replace(tmp, path)
  chunks = chunk_stream(np.load(path), tokens_length)
  if len(chunks) == 0:
    raise ValueError(f"{name} text has fewer than {tokens_length} tokens: not one chunk")
  return chunks


@dataclasses.dataclass(frozen=True)
class _Text:
  source: str  # in words
  key: str  # a hash of the text, keying the tokenizer and token caches
  train_docs: Callable[[], list[str]]
  eval_docs: Callable[[], list[str]]


def _text(cache_dir, text_glob, tfds_name, data_dir, max_documents, max_files, eval_percent=2) -> _Text:
  """The pretraining text: a prepared TFDS dataset, the user's text files, or the embedded corpus."""
  sources.check_eval_percent(eval_percent)
  if tfds_name:
    # TFDS (e.g. c4/en): the first `max_documents` train documents and a tenth as many validation ones,
    # read from ArrayRecord with no TensorFlow. The token cache holds them all, so keep that within RAM.
    train_src, eval_src = (sources.tfds_source(tfds_name, s, data_dir) for s in ("train", "validation"))
    n_train = min(len(train_src), max_documents or len(train_src))
    n_eval = min(len(eval_src), max(1, n_train // 10))
    return _Text(
      f"TFDS {tfds_name} in {data_dir} ({n_train} train documents)",
      hashlib.md5(f"{tfds_name}|{data_dir}|{n_train}|{n_eval}".encode()).hexdigest(),
      lambda: [tasks_lib._text(train_src[i]["text"]) for i in range(n_train)],
      lambda: [tasks_lib._text(eval_src[i]["text"]) for i in range(n_eval)],
    )
  if text_glob is None:
    train_path, eval_path = sources.embedded_corpus(cache_dir, max_files=max_files, eval_percent=eval_percent)
    return _Text(
      "the embedded corpus (Python standard-library docstrings)",
      _md5_files([train_path, eval_path]),
      lambda: sources.read_text_documents(train_path),
      lambda: sources.read_text_documents(eval_path),
    )
  docs = sources.read_text_documents(text_glob)
  split = "" if eval_percent == 2 else f"|eval{eval_percent}"  # the default's key as it always was
  return _Text(
    f"text files {text_glob}",
    hashlib.md5(("\n".join(docs) + split).encode("utf-8")).hexdigest(),
    lambda: [d for d in docs if not sources.is_eval_document(d, eval_percent)],
    lambda: [d for d in docs if sources.is_eval_document(d, eval_percent)],
  )


def _tokenizer(cache_dir, tokenizer_path, text_key, train_docs, vocab_size_spm, extra_ids, user_pieces=()):
  """The given SentencePiece model, else one trained on the train text and cached under the text's key;
  `user_pieces` (UL2's mode tokens) are trained in as whole pieces, or must be in the given model."""
  if tokenizer_path is not None:
    tokenizer = Tokenizer(tokenizer_path, extra_ids=extra_ids)  # FileNotFoundError names a missing path
    missing = [p for p in user_pieces if p not in tokenizer.user_pieces]
    if missing:
      raise ValueError(f"{tokenizer_path} has no user-defined pieces {missing}; train one (tokenizer.path=None)")
    return tokenizer
  suffix = "_" + hashlib.md5("|".join(user_pieces).encode()).hexdigest()[:8] if user_pieces else ""
  spm_path = os.path.join(cache_dir, "tokenizer", f"spm_v{vocab_size_spm}_{text_key[:12]}{suffix}.model")
  return load_or_train_tokenizer(
    spm_path, train_docs, vocab_size_spm, extra_ids=extra_ids, user_defined_symbols=tuple(user_pieces)
  )


def _lengths(inputs_length, noise_density, mean_noise_span_length, extra_ids):
  """(raw chunk length, targets length) that span corruption turns into exactly `inputs_length` inputs."""
  tokens_length, targets_length = compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length)
  _, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
  if num_spans > extra_ids:
    raise ValueError(f"{num_spans} noise spans per row need more sentinels than extra_ids={extra_ids}")
  return tokens_length, targets_length


@dataclasses.dataclass(frozen=True)
class TokenChunks:
  tokenizer: Tokenizer
  train: np.ndarray  # int32[num_chunks, tokens_length]
  eval: np.ndarray
  source: str


def token_chunks(
  cache_dir: str | os.PathLike,
  *,
  tokens_length: int,
  vocab_size_spm: int,
  tokenizer_path: str | os.PathLike | None = None,
  text_glob: str | None = None,
  extra_ids: int = 100,
  user_pieces: tuple[str, ...] = (),
  max_files: int | None = None,
  tfds_name: str | None = None,
  data_dir: str | None = None,
  max_documents: int | None = None,
  eval_percent: int = 2,
) -> TokenChunks:
  """The text (see `build_pretraining_data`), its tokenizer and its train / eval token rows of `tokens_length`,
  each cached in `cache_dir`: what every pretraining objective (span corruption, UL2's denoisers) starts from."""
  cache_dir = os.fspath(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  text = _text(cache_dir, text_glob, tfds_name, data_dir, max_documents, max_files, eval_percent)
  tokenizer = _tokenizer(cache_dir, tokenizer_path, text.key, text.train_docs, vocab_size_spm, extra_ids, user_pieces)
  key = f"{text.key[:12]}_{_md5_files([tokenizer.model_path])[:12]}"
  train, eval_ = (
    _cached_chunks(cache_dir, name, key, tokenizer, docs, tokens_length)
    for name, docs in (("train", text.train_docs), ("eval", text.eval_docs))
  )
  return TokenChunks(tokenizer, train, eval_, text.source)


def build_pretraining_data(
  cache_dir: str | os.PathLike,
  *,
  inputs_length: int,
  batch_size: int,
  seed: int,
  extra_ids: int = 100,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
  eval_seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  **text_options,
) -> PretrainingData:
  """Corpus + tokenizer + chunks + datasets, each cached in `cache_dir` so a rerun takes ~a second.

  `text_options` are `token_chunks`' (vocab_size_spm, tokenizer_path, text_glob, max_files, tfds_name, data_dir,
  max_documents, eval_percent). Text: the embedded standard-library corpus (`max_files` limits it, for tests) or
  `text_glob` (one document per line), each with a deterministic `eval_percent`% of documents held out, or a
  prepared TFDS dataset `tfds_name` in `data_dir` with a "text" field (e.g. c4/en). Tokenizer: `tokenizer_path`
  if given, else a `vocab_size_spm` unigram model trained on the train text, cached under a key of that text.
  """
  tokens_length, targets_length = _lengths(inputs_length, noise_density, mean_noise_span_length, extra_ids)
  text = token_chunks(cache_dir, tokens_length=tokens_length, extra_ids=extra_ids, **text_options)
  tokenizer, train_chunks, eval_chunks = text.tokenizer, text.train, text.eval
  common = dict(
    batch_size=batch_size,
    vocab_size=tokenizer.vocab_size,
    eos_id=tokenizer.eos_id,
    noise_density=noise_density,
    mean_noise_span_length=mean_noise_span_length,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  return PretrainingData(
    tokenizer=tokenizer,
    train=span_corruption_dataset(train_chunks, seed=seed, **common),
    # Eval keeps chunk order and a fixed seed: the same batches whatever the training seed.
    eval=span_corruption_dataset(eval_chunks, seed=eval_seed, shuffle=False, **common),
    tokens_length=tokens_length,
    inputs_length=inputs_length,
    targets_length=targets_length,
    num_train_chunks=len(train_chunks),
    num_eval_chunks=len(eval_chunks),
    source=text.source,
    skipped={},
    eval_chunks=eval_chunks,
  )

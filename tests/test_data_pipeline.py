"""The pretraining pipeline: features, step-indexed determinism, sharding, epochs, caches, sources, errors."""

import os
import time

import numpy as np
import pytest

from t5jax.data import sources
from t5jax.data.loader import iterate_from
from t5jax.data.pretraining import build_pretraining_data, span_corruption_dataset
from t5jax.data.specs import FEATURES

VOCAB_SPM = 400
INPUTS_LENGTH = 64


@pytest.fixture(scope="module")
def text_glob(tmp_path_factory):
  """A small real corpus in two files (~200 KB of stdlib docstrings, one document per line)."""
  docs = sources.stdlib_documents(max_files=40)
  root = tmp_path_factory.mktemp("text")
  half = len(docs) // 2
  (root / "a.txt").write_text("\n".join(docs[:half]) + "\n")
  (root / "b.txt").write_text("\n".join(docs[half:]) + "\n")
  return str(root / "*.txt")


def build(cache_dir, text_glob, **kw):
  args = dict(inputs_length=INPUTS_LENGTH, batch_size=8, seed=0, vocab_size_spm=VOCAB_SPM, text_glob=text_glob)
  return build_pretraining_data(str(cache_dir), **{**args, **kw})


@pytest.fixture(scope="module")
def data(text_glob, tmp_path_factory):
  return build(tmp_path_factory.mktemp("cache"), text_glob)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_features(data):
  assert (data.tokens_length, data.inputs_length, data.targets_length) == (70, 64, 14)
  assert data.tokenizer.vocab_size == VOCAB_SPM + 100
  assert data.num_train_chunks > 100 and data.num_eval_chunks > 0
  for ds in (data.train, data.eval):
    batch = ds[3]
    assert tuple(batch) == FEATURES
    assert all(v.dtype == np.int32 for v in batch.values())
    assert batch["encoder_input_tokens"].shape == (8, 64)
    for k in FEATURES[1:]:
      assert batch[k].shape == (8, 14)
    targets = batch["decoder_target_tokens"]
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)  # T5's start token is pad
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], (targets != 0).astype(np.int32))
    assert (batch["encoder_input_tokens"][:, -1] == 1).all() and (targets[:, -1] == 1).all()
    assert (targets[:, 0] == data.tokenizer.sentinel_id(0)).all()


def test_batches_decode_to_corpus_text(data):
  batch = data.train[0]
  text = data.tokenizer.decode(batch["encoder_input_tokens"][0])
  assert "<extra_id_0>" in text and "<extra_id_1>" in text
  assert data.tokenizer.decode(batch["decoder_target_tokens"][0]).startswith("<extra_id_0>")


def test_step_indexed_and_deterministic(data, text_glob, tmp_path):
  # A separately built pipeline (fresh cache: corpus split, tokenizer and chunks all rebuilt) gives the same
  # batches, in any access order: a resumed run only needs the step.
  other = build(tmp_path, text_glob)
  for step in (5, 0, 123456):
    assert_batches_equal(data.train[step], other.train[step])
  assert_batches_equal(data.eval[2], other.eval[2])
  assert not np.array_equal(data.train[0]["encoder_input_tokens"], data.train[1]["encoder_input_tokens"])
  reseeded = build(tmp_path, text_glob, seed=1)
  assert not np.array_equal(data.train[0]["encoder_input_tokens"], reseeded.train[0]["encoder_input_tokens"])
  assert_batches_equal(data.eval[0], reseeded.eval[0])  # eval does not depend on the training seed
  # The prefetching iterator yields exactly ds[start], ds[start + 1], ...
  it = iterate_from(data.train, 7)
  for step in (7, 8, 9):
    assert_batches_equal(next(it), data.train[step])


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_partition_the_global_batch(shard_count):
  chunks = np.random.default_rng(0).integers(3, 300, size=(50, 70), dtype=np.int32)
  kw = dict(batch_size=8, seed=3, vocab_size=400)
  full = span_corruption_dataset(chunks, **kw)
  shards = [span_corruption_dataset(chunks, shard_index=i, shard_count=shard_count, **kw) for i in range(shard_count)]
  for step in (0, 1, 17):
    parts = [s[step] for s in shards]
    assert parts[0]["encoder_input_tokens"].shape == (8 // shard_count, 64)
    assert_batches_equal({k: np.concatenate([p[k] for p in parts]) for k in FEATURES}, full[step])
  with pytest.raises(ValueError, match="split evenly"):
    span_corruption_dataset(chunks, shard_index=0, shard_count=3, **kw)


def test_epochs_cover_every_chunk_once():
  # Chunk i starts with token 10 + i; the first token of a row is never noise, so inputs[:, 0] names the chunk.
  chunks = np.full((10, 70), 5, dtype=np.int32)
  chunks[:, 0] = 10 + np.arange(10)
  ds = span_corruption_dataset(chunks, batch_size=5, seed=0, vocab_size=400)
  order = np.concatenate([ds[s]["encoder_input_tokens"][:, 0] for s in range(4)]) - 10
  assert sorted(order[:10]) == sorted(order[10:]) == list(range(10))
  assert list(order[:10]) != list(order[10:])  # reshuffled each epoch
  ordered = span_corruption_dataset(chunks, batch_size=5, seed=0, vocab_size=400, shuffle=False)
  assert list(ordered[1]["encoder_input_tokens"][:, 0] - 10) == [5, 6, 7, 8, 9]


def test_cache_makes_rebuild_fast_and_identical(data, text_glob, tmp_path):
  start = time.perf_counter()
  first = build(tmp_path, text_glob)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  second = build(tmp_path, text_glob)
  warm = time.perf_counter() - start
  print(f"tiny corpus build: cold {cold:.2f} s, cached {warm:.3f} s")
  assert warm < 1.0
  assert os.listdir(tmp_path / "tokens") and os.listdir(tmp_path / "tokenizer")
  assert_batches_equal(first.train[4], second.train[4])


def test_given_tokenizer_path(data, text_glob, tmp_path):
  given = build(tmp_path, text_glob, tokenizer_path=data.tokenizer.model_path)
  assert not (tmp_path / "tokenizer").exists()  # nothing trained
  assert_batches_equal(given.train[2], data.train[2])
  missing = str(tmp_path / "nowhere" / "spiece.model")
  with pytest.raises(FileNotFoundError, match="nowhere/spiece.model"):
    build(tmp_path, text_glob, tokenizer_path=missing)


def test_text_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    sources.read_text_documents(str(tmp_path / "nothing-here" / "*.txt"))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.read_text_documents(str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt"):
    sources.read_text_documents(str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    build(tmp_path, str(tmp_path / "nothing-here" / "*.txt"))


def test_embedded_corpus(tmp_path):
  start = time.perf_counter()
  train_path, eval_path = sources.embedded_corpus(tmp_path / "full")
  seconds = time.perf_counter() - start
  train, evals = sources.read_text_documents(train_path), sources.read_text_documents(eval_path)
  size_mb = (os.path.getsize(train_path) + os.path.getsize(eval_path)) / 1e6
  print(f"embedded corpus: {size_mb:.2f} MB, {len(train)} train + {len(evals)} eval documents, {seconds:.1f} s")
  assert size_mb > 0.5 and len(train) > 1000
  assert 0.01 < len(evals) / (len(train) + len(evals)) < 0.03
  assert not set(train) & set(evals)
  assert sources.embedded_corpus(tmp_path / "full") == (train_path, eval_path)  # reused, not rebuilt
  # Same text from a separate build (a small one, to stay fast).
  small = [sources.embedded_corpus(tmp_path / d, max_files=30) for d in ("x", "y")]
  for a, b in zip(*small, strict=True):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read()


@pytest.mark.parametrize("kind,packed", [("span_corruption", False), ("tasks", False), ("tasks", True)])
def test_datasets_yield_the_batch_spec(text_glob, tmp_path, kind, packed):
  """What setup.build and plan compile for (seams.batch_spec, from the config alone) is what the
  datasets produce, for every kind of data."""
  from configs import base, multitask
  from t5jax import seams
  from t5jax.data import pipeline

  config = base.get_config() if kind == "span_corruption" else multitask.get_config(None if packed else "unpacked")
  config.data.source.text_glob, config.data.tokenizer.spm_vocab_size = text_glob, VOCAB_SPM
  config.batch_size = 4
  data = pipeline.from_config(config, tmp_path)
  want = seams.batch_spec(config, rows=4)
  for ds in (data.train, data.eval):
    got = {name: (x.shape, x.dtype) for name, x in ds[1].items()}
    assert got == want
  assert isinstance(data.source, str) and isinstance(data.skipped, dict)


def test_tfds_name_without_data_dir_falls_back_to_the_embedded_corpus_and_says_so(monkeypatch):
  from configs import span_corruption
  from t5jax.data import pipeline

  messages, calls = [], []
  monkeypatch.setattr(pipeline.logging, "warning", lambda msg, *args: messages.append(msg % args))
  monkeypatch.setattr(pipeline.pretraining, "build_pretraining_data", lambda cache, **kw: calls.append(kw))
  pipeline.from_config(span_corruption.get_config(), "/nonexistent")
  assert len(messages) == 1 and "c4/en" in messages[0] and "embedded corpus" in messages[0]
  assert calls[0]["tfds_name"] is None and calls[0]["text_glob"] is None  # -> the embedded corpus


def test_text_too_short_for_one_chunk_and_too_few_sentinels_are_named(text_glob, tmp_path):
  with pytest.raises(ValueError, match=r"^eval text has fewer than \d+ tokens: not one chunk$"):
    build(tmp_path, text_glob, inputs_length=5000, noise_density=0.01)  # the held-out 2% is shorter
  with pytest.raises(ValueError, match=r"noise spans per row need more sentinels than extra_ids=1$"):
    build(tmp_path, text_glob, extra_ids=1)


def test_a_larger_eval_share_keeps_every_document_of_the_smaller_one():
  docs = [f"document number {i} of the held-out test" for i in range(2000)]
  held = {p: {d for d in docs if sources.is_eval_document(d, p)} for p in (2, 6)}
  assert held[2] < held[6] and 20 <= len(held[2]) <= 60 and 80 <= len(held[6]) <= 160  # ~2% and ~6% of 2,000
  with pytest.raises(ValueError, match="config.data.source.eval_percent=5 must be an even number of percent"):
    sources.check_eval_percent(5)

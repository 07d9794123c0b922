"""Tokenizer: T5's id layout, encode/decode, deterministic atomic training, cache, errors."""

import os

import pytest

from t5jax.data import sources
from t5jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_sentencepiece

VOCAB = 400


@pytest.fixture(scope="module")
def texts():
  # Real prose that ships with Python: the first 40 stdlib files' docstrings (~200 KB, <1 s).
  return sources.stdlib_documents(max_files=40)


@pytest.fixture(scope="module")
def model_path(texts, tmp_path_factory):
  return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "spm.model"), VOCAB)


def test_t5_id_layout(model_path):
  tok = Tokenizer(model_path, extra_ids=100)
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok._sp.bos_id() == -1  # T5 has no bos
  assert tok.num_pieces == VOCAB
  assert tok.vocab_size == VOCAB + 100
  # Extra ids follow the pieces and count down: <extra_id_0> is the last id.
  assert tok.sentinel_id(0) == tok.vocab_size - 1
  assert tok.sentinel_id(99) == VOCAB
  assert tok.id_to_piece(tok.sentinel_id(7)) == "<extra_id_7>"
  assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "</s>" and tok.id_to_piece(2) == "<unk>"
  with pytest.raises(ValueError):
    tok.sentinel_id(100)


def test_encode_decode(model_path, texts):
  tok = Tokenizer(model_path)
  text = "Return the number of items in a sequence."
  ids = tok.encode(text)
  assert ids and all(2 < i < tok.num_pieces for i in ids)
  assert tok.encode(text, add_eos=True) == ids + [1]
  assert tok.decode(ids) == text
  # Decode stops at EOS, drops pad, renders sentinels.
  s0, s1 = tok.sentinel_id(0), tok.sentinel_id(1)
  assert tok.decode([0] + ids + [1] + tok.encode("ignored")) == text
  assert tok.decode(tok.encode("Return the") + [s0] + tok.encode(" of items") + [s1, 0, 0]) == (
    "Return the<extra_id_0> of items<extra_id_1>"
  )
  batch = texts[:50]
  assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
  assert tok.encode_batch(batch, add_eos=True)[3] == tok.encode(batch[3], add_eos=True)
  # byte_fallback: characters never seen in training still round-trip, as bytes rather than <unk>.
  assert tok.decode(tok.encode("snowman \u2603")) == "snowman \u2603"


def test_training_is_deterministic_and_atomic(texts, model_path, tmp_path):
  again = train_sentencepiece(texts, str(tmp_path / "again.model"), VOCAB)
  with open(model_path, "rb") as a, open(again, "rb") as b:
    assert a.read() == b.read()
  # Nothing but the model is left behind (training happened in a temporary directory).
  assert os.listdir(tmp_path) == ["again.model"]


def test_train_from_file_path(texts, tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("\n".join(texts))
  tok = Tokenizer(train_sentencepiece(str(path), str(tmp_path / "f.model"), VOCAB))
  assert tok.num_pieces == VOCAB
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    train_sentencepiece(str(tmp_path / "nope.txt"), str(tmp_path / "g.model"), VOCAB)


def test_missing_model_names_path(tmp_path):
  missing = str(tmp_path / "no" / "spiece.model")
  with pytest.raises(FileNotFoundError, match="no/spiece.model"):
    Tokenizer(missing)


def test_load_or_train_caches(texts, tmp_path):
  path = str(tmp_path / "cache" / "spm.model")
  calls = []

  def texts_fn():
    calls.append(1)
    return texts

  first = load_or_train_tokenizer(path, texts_fn, VOCAB, extra_ids=10)
  second = load_or_train_tokenizer(path, texts_fn, VOCAB, extra_ids=10)
  assert calls == [1]  # the second call loaded the cached model and never produced the text
  assert first.vocab_size == second.vocab_size == VOCAB + 10


def test_byte_tokenizer_layout_and_round_trip():
  from t5jax.data.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.vocab_size == 384  # ByT5's: 3 specials + 256 bytes + 125 extra ids
  assert tok.encode("A") == [ord("A") + 3]
  assert tok.encode("\u00e9", add_eos=True) == [0xC3 + 3, 0xA9 + 3, 1]  # UTF-8 bytes, not code points
  assert tok.sentinel_id(0) == 383 and tok.sentinel_id(124) == 259
  assert tok.id_to_piece(383) == "<extra_id_0>" and tok.id_to_piece(1) == "</s>"
  text = "snowman \u2603, caf\u00e9"
  assert tok.decode(tok.encode(text)) == text
  # Stops at EOS, drops pad, renders sentinels; a byte run cut mid-character drops the broken bytes.
  ids = [0] + tok.encode("ab") + [tok.sentinel_id(1)] + tok.encode("\u2603")[:2] + [1] + tok.encode("x")
  assert tok.decode(ids) == "ab<extra_id_1>"
  assert tok.encode_batch(["a", "bc"], add_eos=True) == [tok.encode("a", True), tok.encode("bc", True)]
  with pytest.raises(ValueError):
    tok.sentinel_id(125)


def test_load_tokenizer_from_model_directories(model_path, tmp_path):
  import json
  import shutil
  from t5jax.data.tokenizer import ByteTokenizer, load_tokenizer

  (tmp_path / "t5").mkdir()
  shutil.copyfile(model_path, tmp_path / "t5" / "spiece.model")
  tok = load_tokenizer(tmp_path / "t5")
  assert isinstance(tok, Tokenizer) and tok.vocab_size == VOCAB + 100
  (tmp_path / "byt5").mkdir()
  (tmp_path / "byt5" / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125})
  )
  assert isinstance(load_tokenizer(tmp_path / "byt5"), ByteTokenizer)
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    load_tokenizer(tmp_path)


def test_a_vocabulary_too_small_for_the_text_is_one_line(tmp_path):
  text = ["".join(chr(0x4E00 + i) for i in range(k, k + 40)) for k in range(0, 400, 40)]  # 400 distinct chars
  with pytest.raises(ValueError, match=r"cannot train a 100-piece SentencePiece tokenizer .*spm_vocab_size"):
    train_sentencepiece(text, tmp_path / "small.model", 100)

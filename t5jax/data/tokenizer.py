"""SentencePiece tokenizer with T5's id layout: train one, load one, encode and decode text.

T5's layout: pad=0, eos=1, unk=2, no bos; the sentencepiece pieces come first, then `extra_ids` sentinel ids
appended after them and counted down from the top (`<extra_id_0>` is the last id of the vocabulary). With T5's
own spiece.model that is 32000 pieces + 100 extra ids = 32100 (the model pads its embedding to 32128 elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm

from t5jax import storage
from t5jax.data.tokenizers_json import EOS_ID, PAD_ID, UNK_ID, tokenizers_json


def train_sentencepiece(
  texts: Iterable[str] | str | os.PathLike,
  model_path: str | os.PathLike,
  vocab_size: int,
  *,
  input_sentence_size: int = 300_000,
  max_sentence_length: int = 16_384,
  character_coverage: float = 0.9999,
  byte_fallback: bool = True,
  split_digits: bool = False,
  user_defined_symbols: Sequence[str] = (),
  seed: int = 0,
  num_threads: int = 1,
) -> str:
  """Trains a T5-style unigram model and writes it to `model_path` (atomically); returns the path.

  `texts` is an iterable of documents or the path of a text file; every line of every document is one
  training sentence. Training reads at most `input_sentence_size` sentences (a seeded random sample) so it
  stays fast on large corpora. The result is a pure function of (text, arguments): sentencepiece's sampler
  is seeded, and the temporary paths sentencepiece records are cleared, so two trainings give
  byte-identical files. `num_threads` is part of that contract: sentencepiece's EM sums per-thread
  statistics, so a different thread count gives the same pieces with scores differing by ~1e-5 (and hence
  a slightly different order). The default stays 1, not the machine's core count, so that every machine
  trains the same model. `user_defined_symbols` (UL2's mode tokens) become whole pieces with ids 3, 4, ...
  """
  model_path = os.fspath(model_path)
  out_dir = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm_tmp_") as tmp:
    if isinstance(texts, (str, os.PathLike)):
      input_file = os.fspath(texts)
      if not os.path.exists(input_file):
        raise FileNotFoundError(f"tokenizer training text not found: {input_file}")
    else:
      # A file rather than sentencepiece's sentence_iterator: the file path is the one that supports
      # seeded sampling (input_sentence_size) and reads in C++ at full speed.
      input_file = os.path.join(tmp, "input.txt")
      with open(input_file, "w", encoding="utf-8") as f:
        for text in texts:
          for line in text.splitlines():
            if line.strip():
              f.write(line + "\n")
    prefix = os.path.join(tmp, "spm")
    _train_unigram(
      input_file,
      prefix,
      vocab_size,
      seed=seed,
      character_coverage=character_coverage,
      byte_fallback=byte_fallback,
      split_digits=split_digits,
      user_defined_symbols=list(user_defined_symbols),
      num_threads=num_threads,
      input_sentence_size=input_sentence_size,
      max_sentence_length=max_sentence_length,
    )
    _strip_training_paths(prefix + ".model")
    # Rename into place last: a run killed mid-training leaves only the temporary directory behind.
    os.replace(prefix + ".model", model_path)
  return model_path


def _train_unigram(input_file, prefix, vocab_size, *, seed, split_digits, **options):
  """sentencepiece's unigram training with T5's ids, writing `prefix`.model."""
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
      input=input_file,
      model_prefix=prefix,
      model_type="unigram",
      vocab_size=vocab_size,
      # T5's ids: pad 0, eos 1, unk 2 and no bos (the decoder's start token is pad, not a bos).
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      normalization_rule_name="nmt_nfkc",
      split_digits=split_digits,  # one piece per digit: arithmetic tasks then see every number the same way
      shuffle_input_sentence=True,
      # A corpus too small for `vocab_size` pieces gives a smaller vocabulary instead of an error.
      hard_vocab_limit=False,
      minloglevel=2,
      **options,
    )
  except RuntimeError as e:  # sentencepiece's errors are C++ asserts; the one to expect is a vocab too small
    reason = str(e).split("] ")[-1].split(". Increase")[0]
    raise ValueError(
      f"cannot train a {vocab_size}-piece SentencePiece tokenizer on this text ({reason}); "
      "use a larger config.data.tokenizer.spm_vocab_size"
    ) from None


def _strip_training_paths(path: str) -> None:
  """Clears the (random) temporary paths sentencepiece records in the model, so equal text and arguments
  give byte-identical model files, not just identical pieces."""
  with open(path, "rb") as f:
    proto = _model_proto(f.read())
  del proto.trainer_spec.input[:]
  proto.trainer_spec.model_prefix = ""
  with open(path, "wb") as f:
    f.write(proto.SerializeToString())


class _ExtraIds:
  """T5's id layout shared by both tokenizers: pad 0, eos 1, unk 2, then `num_pieces` ids, then `extra_ids`
  sentinels counting down from the top: `<extra_id_i>` = `vocab_size - 1 - i`."""

  pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID
  num_pieces: int
  extra_ids: int

  @property
  def vocab_size(self) -> int:
    return self.num_pieces + self.extra_ids

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`; sentinels count down from the top of the vocabulary."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel index {i} out of range [0, {self.extra_ids})")
    return self.vocab_size - 1 - i


class Tokenizer(_ExtraIds):
  """A sentencepiece model plus T5's extra (sentinel) ids.

  Ids: `[0, num_pieces)` are sentencepiece pieces, `[num_pieces, vocab_size)` are extra ids with
  `<extra_id_i>` = `vocab_size - 1 - i`.
  """

  def __init__(self, model_path: str | os.PathLike, extra_ids: int = 100):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    self.extra_ids = extra_ids
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.num_pieces = self._sp.get_piece_size()
    with open(model_path, "rb") as f:
      self.user_pieces = _user_pieces(_model_proto(f.read()))
    # Text is split at user pieces before encoding, as transformers splits at added tokens: sentencepiece
    # alone would put a lone "▁" piece before "[S2S]", which training rows (mode id + text) never have.
    self._user_split = re.compile("(" + "|".join(map(re.escape, self.user_pieces)) + ")") if self.user_pieces else None
    if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
        f"{model_path}: expected T5 ids pad=0 eos=1 unk=2, got pad={self._sp.pad_id()} "
        f"eos={self._sp.eos_id()} unk={self._sp.unk_id()}"
      )

  def encode(self, text: str, add_eos: bool = False) -> list[int]:
    """Text to ids; `<extra_id_N>` in the text is plain text here (sentinels are made as ids); a user piece
    (a UL2 mode token such as `[S2S]`) is its one id."""
    if self._user_split is None or not self._user_split.search(text):
      ids = self._sp.encode(text, out_type=int)
    else:
      parts = self._user_split.split(text)  # text, piece, text, ...: pieces at the odd places
      ids = [i for k, part in enumerate(parts) for i in ([self.user_pieces[part]] if k % 2 else self._sp.encode(part))]
    return ids + [EOS_ID] if add_eos else ids

  def encode_batch(self, texts: Sequence[str], add_eos: bool = False, num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts in sentencepiece's C++ thread pool (`num_threads=-1`: all cores)."""
    ids = self._sp.encode(list(texts), out_type=int, add_eos=add_eos, num_threads=num_threads)
    if self._user_split is not None:  # the rare text naming a user piece: encoded as `encode` does
      ids = [self.encode(t, add_eos) if self._user_split.search(t) else x for t, x in zip(texts, ids, strict=True)]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text: stops at the first EOS, drops pad, renders extra ids as `<extra_id_N>`."""
    out, run = [], []

    def flush():
      if run:
        text = self._sp.decode(run)
        # sentencepiece strips the word-boundary space at the start of a decode; after a sentinel
        # that space is real ("<extra_id_0> walks"), so put it back.
        if out and self._sp.id_to_piece(run[0]).startswith("\u2581"):
          text = " " + text
        out.append(text)
        run.clear()

    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i == PAD_ID:
        continue
      if i >= self.num_pieces:
        flush()
        out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
      else:
        run.append(i)
    flush()
    return "".join(out)

  def id_to_piece(self, i: int) -> str:
    if i >= self.num_pieces:
      return f"<extra_id_{self.vocab_size - 1 - i}>"
    return self._sp.id_to_piece(i)


# The files of a Hugging Face T5 tokenizer, as `write_hf_tokenizer` writes them and converted directories carry.
HF_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
  """Writes `tokenizer` into `directory` as a Hugging Face T5 directory holds it, each file atomically.

  spiece.model (for T5Tokenizer and for `load_tokenizer`), tokenizer.json (the `tokenizers` pipeline T5Tokenizer
  builds, plus the model's byte fallback) and tokenizer_config.json (the extra ids and special tokens).
  transformers' T5Tokenizer always turns byte fallback off, encoding characters the tokenizer never saw as
  <unk> where sentencepiece gives their bytes; a model trained with byte fallback therefore names the generic
  fast tokenizer, which reads tokenizer.json as written, so `AutoTokenizer` gives exactly our ids.
  """
  directory = os.fspath(directory)
  storage.makedirs(directory)
  with open(tokenizer.model_path, "rb") as f:
    model = f.read()
  proto = _model_proto(model)
  extras = [f"<extra_id_{i}>" for i in range(tokenizer.extra_ids)]
  byte_fallback = proto.trainer_spec.byte_fallback
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast" if byte_fallback else "T5Tokenizer",
    "extra_ids": tokenizer.extra_ids,
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "additional_special_tokens": extras,
  }
  storage.write_bytes(os.path.join(directory, "spiece.model"), model)  # the same bytes (md5)
  storage.write_bytes(
    os.path.join(directory, "tokenizer.json"),
    json.dumps(tokenizers_json(proto, extras, _user_pieces(proto)), ensure_ascii=False).encode(),
  )
  storage.write_bytes(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2).encode())


def _user_pieces(proto) -> dict[str, int]:
  """{piece: id} of a sentencepiece model's user-defined pieces (UL2's mode tokens, when trained with them)."""
  return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED}


def _model_proto(model: bytes):
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as training does

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  return proto


def load_or_train_tokenizer(
  model_path: str | os.PathLike,
  texts_fn: Callable[[], Iterable[str]],
  vocab_size: int,
  extra_ids: int = 100,
  **train_kwargs,
) -> Tokenizer:
  """Loads `model_path` if it exists; otherwise trains on `texts_fn()` and caches the model there.

  `texts_fn` is a callable so the (possibly expensive) text is only produced when training is needed.
  """
  if not os.path.isfile(model_path):
    train_sentencepiece(texts_fn(), model_path, vocab_size, **train_kwargs)
  tokenizer = Tokenizer(model_path, extra_ids=extra_ids)
  if tokenizer.num_pieces < vocab_size:
    # hard_vocab_limit=False: a small corpus yields fewer pieces rather than failing; say so, since the
    # sentinel ids then sit below where a 32000-piece vocabulary would put them.
    logging.warning(
      "%s: text supports only %d of the %d pieces asked for", model_path, tokenizer.num_pieces, vocab_size
    )
  return tokenizer


class ByteTokenizer(_ExtraIds):
  """ByT5's byte-level tokenizer: pad 0, eos 1, unk 2, then byte b at id b + 3 (ids 3..258).

  Extra (sentinel) ids follow the bytes and count down from the top like `Tokenizer`'s:
  `<extra_id_i>` = `vocab_size - 1 - i`. ByT5's HF config uses 125 extra ids (vocab 384).
  """

  num_special = 3  # ids below the bytes: pad, eos, unk
  num_pieces = 3 + 256  # specials and bytes; extra ids come after

  def __init__(self, extra_ids: int = 125):
    self.extra_ids = extra_ids

  def encode(self, text: str, add_eos: bool = False) -> list[int]:
    ids = [b + self.num_special for b in text.encode("utf-8")]
    return ids + [EOS_ID] if add_eos else ids

  def encode_batch(self, texts: Sequence[str], add_eos: bool = False, num_threads: int = -1) -> list[list[int]]:
    del num_threads  # bytes need no thread pool
    return [self.encode(t, add_eos) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text: stops at the first EOS, drops pad and unk, renders extra ids as `<extra_id_N>`.

    A byte run cut mid-character (a model may emit any byte sequence) decodes with the broken bytes dropped.
    """
    out, run = [], bytearray()
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i >= self.num_pieces:
        out.append(run.decode("utf-8", errors="ignore"))
        run.clear()
        out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
      elif i >= self.num_special:
        run.append(i - self.num_special)
    out.append(run.decode("utf-8", errors="ignore"))
    return "".join(out)

  def id_to_piece(self, i: int) -> str:
    if i >= self.num_pieces:
      return f"<extra_id_{self.vocab_size - 1 - i}>"
    if i < self.num_special:
      return ("<pad>", "</s>", "<unk>")[i]
    return chr(i - self.num_special) if i - self.num_special < 128 else f"<0x{i - self.num_special:02X}>"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | ByteTokenizer:
  """The tokenizer of a model directory (HF T5 or t5jax converted): `spiece.model` if present, else ByT5's.

  Extra ids come from `tokenizer_config.json` when it says (`extra_ids`), else T5's 100 (ByT5's 125).
  """
  directory = os.fspath(directory)
  config = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  spiece = os.path.join(directory, "spiece.model")
  if os.path.isfile(spiece):
    return Tokenizer(spiece, extra_ids=config.get("extra_ids", 100))
  if "ByT5" in str(config.get("tokenizer_class", "")):
    return ByteTokenizer(extra_ids=config.get("extra_ids", 125))
  raise FileNotFoundError(f"{directory}: no spiece.model, and tokenizer_config.json does not name ByT5Tokenizer")

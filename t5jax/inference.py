"""Text in, text out: the tokenizer of a checkpoint directory, input encoding, and batched decoding.

The predict CLI is a thin layer over these; they are as usable from a notebook.
"""

import os
import sys

import numpy as np
import tqdm
from absl import logging

from t5jax import decode, workdir as workdir_lib
from t5jax.data.tokenizer import ByteTokenizer, load_tokenizer

BYT5_VOCAB = 384   # ByT5's padded vocabulary: a model this size reads bytes


def find_tokenizer(path, config):
  """The tokenizer a checkpoint directory was trained or published with.

  A training workdir: the one the run recorded (`workdir.load_run_tokenizer`: missing or changed is an
  error). A Hugging Face or converted directory: its spiece.model / tokenizer_config.json. Else bytes for
  a ByT5-sized vocabulary.
  """
  if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json")):
    return workdir_lib.load_run_tokenizer(path)
  if os.path.isfile(os.path.join(path, "spiece.model")) or os.path.isfile(
      os.path.join(path, "tokenizer_config.json")):
    return load_tokenizer(path)
  if config.vocab_size == BYT5_VOCAB:
    return ByteTokenizer()
  raise FileNotFoundError(f"{path}: no tokenizer found (spiece.model or tokenizer_config.json)")


def encode_inputs(tokenizer, texts, max_length, strict):
  """Token ids per text (EOS-terminated; [] for an empty text), truncated or rejected past `max_length`."""
  out = []
  for number, text in enumerate(texts, 1):
    if not text.strip():
      out.append([])
      continue
    ids = tokenizer.encode(text, add_eos=True)
    if len(ids) > max_length:
      if strict:
        raise ValueError(f"input {number} has {len(ids)} tokens, more than --max_input_length={max_length}")
      logging.warning("input %d has %d tokens; truncated to --max_input_length=%d", number, len(ids),
                      max_length)
      ids = ids[:max_length - 1] + [tokenizer.eos_id]
    out.append(ids)
  return out


def padded(id_lists, rows):
  """int32 [rows, width]: the id lists left-aligned, width rounded up to a multiple of 32 so that a file
  compiles a few programs rather than one per batch shape."""
  ids = np.zeros((rows, -(-max(len(x) for x in id_lists) // 32) * 32), np.int32)
  for j, x in enumerate(id_lists):
    ids[j, :len(x)] = x
  return ids


def predict(model, params, tokenizer, encoded, *, batch_size=16, progress=False, **decode_kwargs):
  """A list (per input) of lists (per return sequence) of texts. Empty inputs give empty texts.

  Batches are padded to `batch_size` rows and to a multiple of 32 tokens (`padded`).
  """
  num_return = decode_kwargs.get("num_return_sequences", 1)
  results = [[""] * num_return for _ in encoded]
  todo = [i for i, ids in enumerate(encoded) if ids]
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  for rows in tqdm.tqdm(batches, desc="predict", unit="batch", disable=not progress, file=sys.stderr):
    ids = padded([encoded[i] for i in rows], batch_size)
    tokens = np.asarray(decode.generate(model, params, ids, **decode_kwargs))
    for j, i in enumerate(rows):
      results[i] = [tokenizer.decode(t.tolist()) for t in tokens[j * num_return:(j + 1) * num_return]]
  return results

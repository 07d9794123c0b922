"""Text (or video) in, text out: the tokenizer of a checkpoint directory, input encoding, batched decoding,
and captions of video files from a video run's workdir.

The predict CLI is a thin layer over these; they are as usable from a notebook.
"""

import os
import sys

import numpy as np
import tqdm
from absl import logging

from t5jax import decode, storage
from t5jax.workdir import record as workdir_lib
from t5jax.data.tokenizer import ByteTokenizer, load_tokenizer

BYT5_VOCAB = 384  # ByT5's padded vocabulary: a model this size reads bytes


def find_tokenizer(path, config):
  """The tokenizer a checkpoint directory was trained or published with.

  A training workdir: the one the run recorded (`workdir.load_run_tokenizer`: missing or changed is an
  error). A Hugging Face or converted directory: its spiece.model / tokenizer_config.json. Else bytes for
  a ByT5-sized vocabulary.
  """
  if storage.isdir(os.path.join(path, "checkpoints")) and storage.isfile(os.path.join(path, "config.json")):
    return workdir_lib.load_run_tokenizer(path)
  if os.path.isfile(os.path.join(path, "spiece.model")) or os.path.isfile(os.path.join(path, "tokenizer_config.json")):
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
      logging.warning("input %d has %d tokens; truncated to --max_input_length=%d", number, len(ids), max_length)
      ids = ids[: max_length - 1] + [tokenizer.eos_id]
    out.append(ids)
  return out


def padded(id_lists, rows):
  """int32 [rows, width]: the id lists left-aligned, width rounded up to a multiple of 32 so that a file
  compiles a few programs rather than one per batch shape."""
  ids = np.zeros((rows, -(-max(len(x) for x in id_lists) // 32) * 32), np.int32)
  for j, x in enumerate(id_lists):
    ids[j, : len(x)] = x
  return ids


def predict(model, params, tokenizer, encoded, *, batch_size=16, progress=False, **decode_kwargs):
  """A list (per input) of lists (per return sequence) of texts. Empty inputs give empty texts.

  Batches are padded to `batch_size` rows and to a multiple of 32 tokens (`padded`).
  """
  num_return = decode_kwargs.get("num_return_sequences", 1)
  results = [[""] * num_return for _ in encoded]
  todo = [i for i, ids in enumerate(encoded) if ids]
  batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
  for rows in tqdm.tqdm(batches, desc="predict", unit="batch", disable=not progress, file=sys.stderr):
    ids = padded([encoded[i] for i in rows], batch_size)
    tokens = np.asarray(decode.generate(model, params, ids, **decode_kwargs))
    for j, i in enumerate(rows):
      results[i] = [tokenizer.decode(t.tolist()) for t in tokens[j * num_return : (j + 1) * num_return]]
  return results


def video_settings(workdir):
  """`config.data.video` of the video run that trained `workdir`: how its clips are sampled and prefixed."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  try:
    return ml_collections.ConfigDict(workdir_lib.read_record(workdir)["config"]["data"]["video"])
  except (FileNotFoundError, KeyError) as e:
    raise FileNotFoundError(
      f"{workdir}: a video model's clip settings come from the config.json of the workdir that trained it ({e})"
    ) from None


def _read_clip(sampler, path):
  """The centred eval clip of one file; any failure is a ValueError naming the file."""
  from t5jax.data.video import VideoReadError  # pylint: disable=import-outside-toplevel

  try:
    return sampler(path)
  except (VideoReadError, ValueError, IndexError) as e:  # VideoReadError's message starts with the path
    raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None


def video_batch(sampler, prefix, paths, rows):
  """The model's video inputs for `paths` (at most `rows`), padded to `rows` rows so every batch compiles
  to one program: {"frames", "frame_mask"[, "prefix_tokens"]}, as the run's eval batches hold them."""
  clips = [_read_clip(sampler, p) for p in paths]
  frames = np.zeros((rows, *clips[0]["frames"].shape), np.uint8)
  mask = np.ones((rows, len(clips[0]["valid"])), bool)
  for j, clip in enumerate(clips):
    frames[j], mask[j] = clip["frames"], clip["valid"]
  batch = {"frames": frames, "frame_mask": mask}
  if prefix is not None:
    batch["prefix_tokens"] = np.tile(prefix, (rows, 1))
  return batch


def caption_videos(model, params, tokenizer, video_config, paths, *, batch_size=16, max_new_tokens=64, progress=False):
  """A caption per video path ("" for an empty path), greedy, as `t5jax.evaluate` captions held-out videos.

  Each clip is what the run's evaluation reads: `video_dataset.sampler_from` with no rng (centred clip and
  crop, padded frames marked), the run's text prefix (`video_dataset.prefix_tokens`), and the model's
  device-side eval preprocessing inside `greedy_captions`. `model` is a `VideoT5` without augmentation.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from t5jax.data import video_dataset  # pylint: disable=import-outside-toplevel
  from t5jax.model.video import greedy_captions  # pylint: disable=import-outside-toplevel

  missing = [p for p in paths if p.strip() and not os.path.isfile(p)]
  if missing:  # before any decoding, so a typo in a long list fails at once
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{missing[0]}: no such video file{more}")
  sampler, prefix = video_dataset.sampler_from(video_config), video_dataset.prefix_tokens(tokenizer, video_config)
  run = jax.jit(lambda p, inputs: greedy_captions(model, p, inputs, max_new_tokens))
  results = [""] * len(paths)
  todo = [i for i, p in enumerate(paths) if p.strip()]
  batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
  for rows in tqdm.tqdm(batches, desc="predict", unit="batch", disable=not progress, file=sys.stderr):
    out = np.asarray(run(params, video_batch(sampler, prefix, [paths[i] for i in rows], batch_size)))
    for j, i in enumerate(rows):
      results[i] = tokenizer.decode(out[j].tolist())
  return results

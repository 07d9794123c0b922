"""Video-to-text data: a folder of videos plus an annotation file -> batches of uint8 clips and caption tokens.

`build_video_data(...).train[step]` is this host's share of global batch `step`:
  frames                 uint8 [rows, T, H, W, 3]   (float conversion and augmentation run on the device)
  frame_mask             bool [rows, T]             (False: padding of a video shorter than the clip)
  prefix_tokens          int32 [rows, prefix_length] (only with config.data.video.prefix: its ids, zero-padded)
  decoder_target_tokens  int32 [rows, targets_length] (the caption, EOS, zero padding)
  decoder_input_tokens   int32 [rows, targets_length] (the targets shifted right, T5's start id 0 first)
  decoder_loss_weights   int32 [rows, targets_length]
a pure function of (seed, step, shard): example position i of the run takes a per-epoch shuffle of the
training videos and draws its clip offset and crop from `np.random.default_rng((seed, i))`, so a resumed or
rebuilt run reads the same batch n, in any loader worker.

Each clip is read in a reader process of the loader thread's own (`guarded.py`), with a deadline of
`config.data.video.read_timeout` seconds: a video whose read errs, hangs or crashes the decoder is replaced by
the next video by index (its clip from rng (seed, 3, i, attempt), the same on every run), and the batch carries
((path, why), ...) of what it replaced under `loader.FAILED_READS` for the trainer to count and name.

The held-out split is a fixed fraction of the videos chosen by a hash of each path, so it does not move when
the seed or the annotation order changes; its clips are centred and cropped in the middle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import grain
import numpy as np

from t5jax import storage
from t5jax.data import guarded, loader, video_index, video_synthetic
from t5jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from t5jax.data.video import ClipSampler, ClipSpec, VideoReadError

SYNTHETIC_DIR = "synthetic_videos"
MAX_REPLACEMENTS = 16  # more unreadable videos in a row than this is no bad file but a bad setting: stop


@dataclasses.dataclass(frozen=True)
class VideoData:
  tokenizer: Tokenizer
  train: grain.MapDataset
  eval: grain.MapDataset
  eval_examples: tuple  # (path, caption) of the held-out videos, in eval order
  targets_length: int
  source: str  # what was read, in words (recorded in the workdir's config.json)
  skipped: dict  # {"unreadable_videos": n}: listed videos the index left out
  step_counts: tuple = (loader.FAILED_READS,)  # what the trainer counts per logged interval (loader.py)
  readers: tuple = ()  # guarded.PerThread of train and eval: this process's reader processes

  def close(self):
    """Ends this process's reader processes now (a later read starts new ones). Loader threads' readers end
    with their threads; the main thread's (evaluation's) would otherwise live as long as this object."""
    for reads in self.readers:
      reads.close()


def frame_shape(v):
  """(T, H, W, 3) of the clips that `config.data.video` = v yields."""
  h, w = v.crop or v.size
  return (v.num_frames, h, w, 3)


def batch_spec(config, rows):
  """{feature: (shape, dtype)} of a batch of `rows` clips that `config.data` (kind video) yields."""
  d = config.data
  decoder = ((rows, d.targets_length), np.dtype(np.int32))
  spec = {
    "frames": ((rows,) + frame_shape(d.video), np.dtype(np.uint8)),
    "frame_mask": ((rows, d.video.num_frames), np.dtype(np.bool_)),
    **{name: decoder for name in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")},
  }
  if d.video.get("prefix"):
    spec["prefix_tokens"] = ((rows, d.video.prefix_length), np.dtype(np.int32))
  return spec


def check_config(config):
  """decord and PyAV open local files: a gs:// folder or annotation file is one line naming the fix."""
  for key in ("root", "annotations"):
    value = config.data.video[key]
    if value and storage.is_remote(value):
      raise ValueError(
        f"config.data.video.{key}={value}: videos are read from a local disk; copy them there "
        f"(gcloud storage cp -r) and name the local path"
      )


def sampler_from(v):
  """The ClipSampler of `config.data.video` = v: resize at decode to `size`, then a host crop of `crop`."""
  h, w = v.size
  return ClipSampler(
    clip=ClipSpec(v.num_frames, stride=v.stride, short=v.short),
    crop=tuple(v.crop) if v.crop else None,
    width=w,
    height=h,
    mode=v.mode,
    backend=v.backend,
  )


def is_held_out(path: str, fraction: float) -> bool:
  """Whether `path` belongs to the held-out split: a hash of the path, so the split is the same every run."""
  return int(hashlib.md5(path.encode("utf-8")).hexdigest()[:8], 16) < fraction * 2**32


def prefix_tokens(tokenizer, v):
  """int32 [v.prefix_length]: the ids of `config.data.video.prefix` = v.prefix (no EOS; the video tokens
  follow it), zero-padded; None without a prefix. Training, evaluation and predict all take it from here."""
  if not v.get("prefix"):
    return None
  ids = tokenizer.encode(v.prefix, add_eos=False)
  if len(ids) > v.prefix_length:
    raise ValueError(
      f"config.data.video.prefix={v.prefix!r} is {len(ids)} tokens, more than "
      f"config.data.video.prefix_length={v.prefix_length}"
    )
  if tokenizer.unk_id in ids:
    raise ValueError(f"config.data.video.prefix={v.prefix!r} has characters the tokenizer does not know")
  out = np.zeros(v.prefix_length, np.int32)
  out[: len(ids)] = ids
  return out


def _tokens(tokenizer, captions, length):
  """Targets [n, length] int32: each caption's ids trimmed so EOS fits, then EOS, then zeros."""
  out = np.zeros((len(captions), length), np.int32)
  for i, ids in enumerate(tokenizer.encode_batch(list(captions), add_eos=False)):
    ids = ids[: length - 1] + [tokenizer.eos_id]
    out[i, : len(ids)] = ids
  return out


class VideoStep:
  """grain map: step -> this shard's rows of global batch `step` (the feature layout of the module doc).

  `shuffle_seed` None: the examples in order, centred clips (evaluation); else example position i reads
  example perm_e[i % n] of the epoch-e permutation and draws its clip from rng (seed, i). `read_timeout`: the
  seconds one clip read may take in its reader process (configs/video.py's default; 0: read unguarded).
  """

  def __init__(
    self,
    root,
    paths,
    targets,
    sampler,
    *,
    prefix,
    batch_size,
    shard_index,
    shard_count,
    shuffle_seed,
    read_timeout=30.0,
  ):
    self.root, self.paths, self.targets, self.sampler, self.prefix = root, list(paths), targets, sampler, prefix
    self.rows = batch_size // shard_count
    self.batch_size, self.shard_index, self.shuffle_seed = batch_size, shard_index, shuffle_seed
    # Each loader thread reads in a child process of its own, with a deadline per clip; 0: in the thread itself.
    self.reads = guarded.PerThread(read_timeout) if read_timeout > 0 else None
    self.failed = {}  # path -> why: files that failed in this process are replaced without another try

  def __getstate__(self):
    return dict(self.__dict__, failed={})  # each loader worker learns its own

  def _example(self, position):
    n = len(self.paths)
    if self.shuffle_seed is None:
      return position % n, None
    epoch, offset = divmod(position, n)
    perm = np.random.default_rng((self.shuffle_seed, 1, epoch)).permutation(n)
    return int(perm[offset]), np.random.default_rng((self.shuffle_seed, 2, position))

  def examples(self, step):
    """[(video index, rng or None)] of this shard's rows of global batch `step`: which video each row reads,
    and the rng its clip (and crop) is drawn from."""
    first = step * self.batch_size + self.shard_index * self.rows
    return [self._example(first + r) for r in range(self.rows)]

  def _read(self, path, rng):
    if path in self.failed:
      raise guarded.CallFailed(self.failed[path])
    try:
      return self.reads.call(self.sampler, path, rng) if self.reads else self.sampler(path, rng)
    except (guarded.CallFailed, VideoReadError) as e:
      self.failed[path] = str(e).removeprefix(f"{path}: ")
      raise guarded.CallFailed(self.failed[path]) from None

  def _clip(self, position, index, rng, failures):
    """(video index, clip) of example `position`: video `index`, or if it cannot be read (an error, a crash, or
    no clip within the read timeout) the next video by index that can, its clip drawn from rng (seed, 3,
    position, attempt): the same replacement on every run and on resume. Each failure goes in `failures`."""
    n = len(self.paths)
    for attempt in range(min(n, MAX_REPLACEMENTS + 1)):
      i = (index + attempt) % n
      path = os.path.join(self.root, self.paths[i])
      if attempt and rng is not None:
        rng = np.random.default_rng((self.shuffle_seed, 3, position, attempt))
      try:
        return i, self._read(path, rng)
      except guarded.CallFailed as e:
        failures.append((path, str(e)))
    raise ValueError(f"{len(failures)} videos in a row could not be read, e.g. {failures[0][0]}: {failures[0][1]}")

  def __call__(self, step):
    first, failures = step * self.batch_size + self.shard_index * self.rows, []
    picked = [self._clip(first + r, i, rng, failures) for r, (i, rng) in enumerate(self.examples(step))]
    clips = [clip for _, clip in picked]
    targets = self.targets[[i for i, _ in picked]]
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]  # T5 starts decoding from id 0 (the pad id)
    batch = {
      "frames": np.stack([c["frames"] for c in clips]),
      "frame_mask": np.stack([c["valid"] for c in clips]),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": inputs,
      "decoder_loss_weights": (targets != 0).astype(np.int32),
    }
    if self.prefix is not None:
      batch["prefix_tokens"] = np.tile(self.prefix, (self.rows, 1))
    if failures:
      batch[loader.FAILED_READS] = tuple(failures)
    return batch


def _dataset_files(v, cache_dir):
  """(root, annotations) as configured; unset, synthetic videos made once in the cache."""
  if v.root or v.annotations:
    if not (v.root and v.annotations):
      raise ValueError("config.data.video.root and config.data.video.annotations must be set together")
    return v.root, v.annotations
  root = os.path.join(cache_dir, SYNTHETIC_DIR)
  ann = video_synthetic.make_synthetic_videos(
    root, v.synthetic.count, seed=v.synthetic.seed, num_frames=v.synthetic.num_frames, size=v.synthetic.size
  )
  return root, ann


def _tokenizer(examples, cache_dir, vocab_size_spm, tokenizer_path, prefix):
  if tokenizer_path:
    return Tokenizer(tokenizer_path)
  captions = [c for _, c in examples] + ([prefix] if prefix else [])  # the prefix's characters must be known
  key = hashlib.md5("\n".join(captions).encode("utf-8")).hexdigest()[:12]
  path = os.path.join(cache_dir, "tokenizer", f"spm_captions_nobytes_v{vocab_size_spm}_{key}.model")
  # Without byte fallback: captions are a small text, and 256 byte pieces would crowd out its words (a
  # character never seen in a training caption becomes <unk>).
  return load_or_train_tokenizer(path, lambda: captions, vocab_size_spm, byte_fallback=False)


def build_video_data(
  v,
  cache_dir,
  *,
  targets_length,
  batch_size,
  seed,
  vocab_size_spm=4000,
  tokenizer_path=None,
  shard_index=0,
  shard_count=1,
) -> VideoData:
  """`config.data.video` = v -> index (cached in cache_dir), tokenizer and train / eval datasets."""
  if batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(f"batch_size {batch_size} must split evenly over {shard_count} shards")
  root, annotations = _dataset_files(v, cache_dir)
  index = video_index.build_index(
    root,
    annotations,
    os.path.join(cache_dir, "video_index"),
    backend=v.backend,
    timeout=v.timeout,
    num_workers=v.index_workers,
  )
  held_out = [is_held_out(p, v.eval_fraction) for p, _ in index.examples]
  train_ex = [e for e, h in zip(index.examples, held_out, strict=True) if not h]
  eval_ex = [e for e, h in zip(index.examples, held_out, strict=True) if h]
  if not train_ex or not eval_ex:
    raise ValueError(
      f"config.data.video.eval_fraction={v.eval_fraction} leaves {len(train_ex)} training and "
      f"{len(eval_ex)} held-out videos of {len(index.examples)} in {annotations}; both need some"
    )
  tokenizer = _tokenizer(train_ex, cache_dir, vocab_size_spm, tokenizer_path, v.get("prefix"))
  sampler = sampler_from(v)
  step_kw = dict(
    prefix=prefix_tokens(tokenizer, v),
    batch_size=batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    read_timeout=v.read_timeout,
  )

  def step(examples, shuffle_seed):
    paths, captions = zip(*examples, strict=True)
    return VideoStep(
      root, paths, _tokens(tokenizer, captions, targets_length), sampler, shuffle_seed=shuffle_seed, **step_kw
    )

  train, evaluation = step(train_ex, seed), step(eval_ex, None)
  return VideoData(
    tokenizer=tokenizer,
    train=grain.MapDataset.range(2**62).map(train),
    eval=grain.MapDataset.range(2**62).map(evaluation),
    eval_examples=tuple(eval_ex),
    targets_length=targets_length,
    skipped={"unreadable_videos": index.num_skipped},
    source=f"video {annotations} ({len(train_ex)} train / {len(eval_ex)} held-out videos, "
    f"{index.num_skipped} unreadable)",
    readers=tuple(s.reads for s in (train, evaluation) if s.reads),
  )

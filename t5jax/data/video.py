"""Reading frames from video files: one `VideoReader` over two backends (decord, PyAV), and clip sampling.

Frames come back as uint8 numpy arrays in the order asked for, [T, H, W, 3] ("THWC") or [T, 3, H, W]
("TCHW"). Two ways to get them:
  seek    each distinct frame is found on its own: a seek to the keyframe before it, then decode up to it
          (or, if it lies ahead in the group of pictures being decoded, decode on to it). Best for a few
          frames far apart.
  stream  one seek to the smallest index, then a single decode pass up to the largest; frames in between that
          were not asked for are decoded but never converted to RGB. Best for a clip (dense or strided).
Both give the same frames. Frame i is the i-th frame in presentation order, numbered as decord numbers them
(by the container's packet timestamps), and the PyAV backend builds the same table so the two agree.

A reader holds an open decoder, which cannot be pickled: pickling keeps only the arguments and the next use
reopens the file, so a reader (or a `ClipSampler`) travels into grain's worker processes as it is.

Everything here is numpy and host-side; normalization and augmentation run on the device
(`t5jax/model/video_augment.py`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

_BACKENDS = ("decord", "pyav")
_MODES = ("seek", "stream")
_FORMATS = ("THWC", "TCHW")


class VideoReadError(RuntimeError):
  """A video that cannot be opened or decoded; the message starts with the file's path."""


def _output_size(src_h: int, src_w: int, width: int, height: int) -> tuple[int, int]:
  """(height, width) of returned frames: -1 keeps the source size, one of the two given keeps the aspect."""
  if width > 0 and height > 0:
    return height, width
  if width > 0:
    return max(1, round(src_h * width / src_w)), width
  if height > 0:
    return height, max(1, round(src_w * height / src_h))
  return src_h, src_w


class _Decord:
  """decord's VideoReader; resizing is done by its ffmpeg filter graph as frames are decoded."""

  def __init__(self, path, width, height, num_threads):
    import decord  # pylint: disable=import-outside-toplevel

    both = width > 0 and height > 0
    self._vr = decord.VideoReader(
      path, width=width if both else -1, height=height if both else -1, num_threads=num_threads
    )
    self._size = (height, width) if both else None
    if (width > 0) != (height > 0):  # one side given: the other follows the source's aspect ratio
      self._size = _output_size(*self.size, width, height)
      self._vr = decord.VideoReader(path, width=self._size[1], height=self._size[0], num_threads=num_threads)
    self.fps = float(self._vr.get_avg_fps())
    self.num_frames = len(self._vr)
    self._batch_ok = True  # until get_batch meets a row-padded width (stream_frames)

  @property
  def size(self):
    # decord tells the size only by decoding a frame, so that is done only when asked (reads seek anyway).
    if self._size is None:
      self._size = tuple(self._vr[0].shape[:2])
    return self._size

  @staticmethod
  def _array(frames):
    # decord (0.6 and decord2 3.4 alike) pads each RGB row to a multiple of 64 bytes and, when the padded row is
    # a whole number of pixels (widths 16, 24, 48, 72, ...), returns it as [..., H, W, 4 or 6]: drop the padding.
    array = frames.asnumpy()
    *lead, h, w, c = array.shape
    return array if c == 3 else array.reshape(*lead, h, -1)[..., : w * 3].reshape(*lead, h, w, 3)

  def seek_frames(self, indices):
    return np.stack([self._array(self._vr[int(i)]) for i in indices])

  def stream_frames(self, indices):
    # get_batch of increasing indices is one pass in decord's C++ (frames in between are decoded and skipped,
    # not converted to RGB), copied out once: ~10% faster than a Python loop over next(). It cannot copy out
    # the row-padded frames of `_array` (a size check fails); those widths take the loop.
    if self._batch_ok:
      try:
        return self._array(self._vr.get_batch(indices.tolist()))
      except Exception as e:  # pylint: disable=broad-except  (decord.DECORDError, imported lazily)
        if "must exactly match" not in str(e):
          raise
        self._batch_ok = False
    self._vr.seek_accurate(int(indices[0]))
    frames, position = [], int(indices[0])
    for i in indices:
      if i > position:
        self._vr.skip_frames(int(i) - position)  # decoded, not converted to RGB
      frames.append(self._array(self._vr.next()))
      position = int(i) + 1
    return np.stack(frames)

  def close(self):
    self._vr = None


class _PyAV:
  """PyAV (FFmpeg's libraries); resizing is done by its reformatter (swscale) on each decoded frame.

  Frame numbers follow decord's: the video packets' timestamps, sorted, are frames 0..n-1. Scanning the packets
  reads the file once without decoding.
  """

  def __init__(self, path, width, height, num_threads):
    import av  # pylint: disable=import-outside-toplevel

    self._container = av.open(path)
    self._stream = self._container.streams.video[0]
    packets = [
      (p.pts if p.pts is not None else p.dts, p.is_keyframe) for p in self._container.demux(self._stream) if p.size
    ]
    packets = [(stamp, key) for stamp, key in packets if stamp is not None]
    self._pts = np.sort(np.asarray([stamp for stamp, _ in packets], np.int64))
    self._index_of = {int(p): i for i, p in enumerate(self._pts)}
    # For each frame, the keyframe a decode must start from to reach it.
    keys = np.searchsorted(self._pts, sorted(stamp for stamp, key in packets if key))
    before = np.searchsorted(keys, np.arange(len(self._pts)), side="right") - 1
    self._keyframe_of = keys[np.maximum(before, 0)] if len(keys) else np.zeros(len(self._pts), np.int64)
    self.num_frames = len(self._pts)
    rate = self._stream.average_rate or self._stream.guessed_rate
    self.fps = float(rate) if rate else 0.0
    ctx = self._stream.codec_context
    self.size = _output_size(ctx.height, ctx.width, width, height)
    if num_threads > 0:
      ctx.thread_count = num_threads
    ctx.thread_type = "AUTO"

  def _rgb(self, frame):
    h, w = self.size
    # Bicubic is what decord's scale filter does (FFmpeg 8's default in decord2; decord 0.6's FFmpeg 4 filter was
    # bilinear): measured against it, other swscale methods differ more.
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")

  def _decode_from(self, index):
    """Yields (frame index, frame) from the keyframe at or before `index` on."""
    self._container.seek(int(self._pts[index]), stream=self._stream, backward=True)
    previous = -1
    for frame in self._container.decode(self._stream):
      # A frame without a timestamp (rare, some AVI muxers) is taken to be the one after the last seen.
      i = self._index_of.get(frame.pts, previous + 1) if frame.pts is not None else previous + 1
      previous = i
      yield i, frame

  def seek_frames(self, indices):
    frames, decoder, position = [], None, -1
    for target in indices:
      # Like decord: a frame ahead in the group of pictures being decoded is reached by decoding on; any other
      # by a seek to its keyframe, which skips the groups in between.
      if decoder is None or self._keyframe_of[target] > position:
        decoder = self._decode_from(int(target))
      for position, frame in decoder:
        if position >= target:
          frames.append(self._rgb(frame))
          break
      else:
        raise IndexError(f"frame {target} not found after seeking")
    return np.stack(frames)

  def stream_frames(self, indices):
    wanted, frames = list(indices), []
    for i, frame in self._decode_from(int(wanted[0])):
      while wanted and i >= wanted[0]:  # i > wanted[0] only if a frame is missing from the stream
        frames.append(self._rgb(frame))
        wanted.pop(0)
      if not wanted:
        return np.stack(frames)
    raise IndexError(f"stream ended before frame {wanted[0]}")

  def close(self):
    self._container.close()


class VideoReader:
  """Frames of one video file as uint8 arrays; see the module docstring for the modes.

  Attributes: `num_frames`, `fps`, and `size` = (height, width) of the frames returned (after resizing; with
  decord at source size, its first use decodes a frame). width / height of -1 keep the source size; giving
  only one keeps the aspect ratio. num_threads=0 lets the decoder choose.
  """

  def __init__(
    self,
    path: str,
    mode: str = "stream",
    output_format: str = "THWC",
    width: int = -1,
    height: int = -1,
    num_threads: int = 0,
    backend: str = "decord",
  ):
    if mode not in _MODES or output_format not in _FORMATS or backend not in _BACKENDS:
      raise ValueError(
        f"mode must be one of {_MODES}, output_format of {_FORMATS}, backend of {_BACKENDS}; "
        f"got {mode!r}, {output_format!r}, {backend!r}"
      )
    self._args = dict(
      path=str(path),
      mode=mode,
      output_format=output_format,
      width=width,
      height=height,
      num_threads=num_threads,
      backend=backend,
    )
    self.path, self.mode, self.output_format, self.backend = str(path), mode, output_format, backend
    self._impl = None
    self._open()

  def _open(self):
    # Decoders report a missing or empty file in C++ log lines and vague messages; say it plainly first.
    if not os.path.isfile(self.path):
      raise VideoReadError(f"{self.path}: no such file")
    if os.path.getsize(self.path) == 0:
      raise VideoReadError(f"{self.path}: empty file")
    impl = _Decord if self.backend == "decord" else _PyAV
    a = self._args
    try:
      self._impl = impl(self.path, a["width"], a["height"], a["num_threads"])
    except Exception as e:  # decord raises RuntimeError / DECORDError, PyAV its own FFmpegError family
      raise VideoReadError(f"{self.path}: cannot open with {self.backend}: {_short(e)}") from e
    if self._impl.num_frames == 0:
      raise VideoReadError(f"{self.path}: no video frames")
    self.num_frames, self.fps = self._impl.num_frames, self._impl.fps

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) of the frames returned."""
    if self._impl is None:
      self._open()
    return self._impl.size

  def read_frames(self, indices) -> np.ndarray:
    """uint8 frames at `indices` (any order, repeats allowed): [T, H, W, 3] or [T, 3, H, W]."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size == 0:
      raise ValueError(f"{self.path}: no frame indices given")
    if indices.min() < 0 or indices.max() >= self.num_frames:
      raise IndexError(
        f"{self.path}: frame indices must be in [0, {self.num_frames}); got {indices.min()}..{indices.max()}"
      )
    if self._impl is None:
      self._open()
    # Each distinct frame is decoded once, in increasing order, then gathered into the order asked for.
    unique, where = np.unique(indices, return_inverse=True)
    try:
      if self.mode == "seek":
        frames = self._impl.seek_frames(unique)
      else:
        frames = self._impl.stream_frames(unique)
    except Exception as e:
      raise VideoReadError(
        f"{self.path}: cannot decode frames {unique.min()}..{unique.max()} with {self.backend}: {_short(e)}"
      ) from e
    if len(unique) < len(indices) or (np.diff(indices) < 0).any():  # else they are `unique` already: no copy
      frames = frames[where]
    if self.output_format == "TCHW":
      frames = frames.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(frames)

  def close(self):
    if self._impl is not None:
      self._impl.close()
      self._impl = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __getstate__(self):
    return {"args": self._args, "num_frames": self.num_frames, "fps": self.fps}

  def __setstate__(self, state):
    # Reopened lazily on the first read, so unpickling in a worker costs nothing until it is used.
    a = state["args"]
    self.path, self.mode, self.output_format, self.backend = a["path"], a["mode"], a["output_format"], a["backend"]
    self._args, self._impl = a, None
    self.num_frames, self.fps = state["num_frames"], state["fps"]


def _short(e: Exception) -> str:
  """The first line of an exception, without decord's C++ source location prefix."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text.rsplit(": ", 1)[-1] if "/src/" in text else text


# ---------------------------------------------------------------------------------------------------------
# Clips: which frames, and which pixels, of a video make one example. Pure numpy: a training clip is a
# function of its rng, so `np.random.default_rng((seed, index))` makes example `index` the same on every run.


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """`num_frames` frames, `stride` source frames apart, or as many as make `target_fps` if it is set.

  A video shorter than the clip is looped (`short="loop"`) or padded by repeating its last frame
  (`short="pad"`, with those positions marked not valid).
  """

  num_frames: int
  stride: float = 1.0
  target_fps: float | None = None
  short: str = "loop"

  def __post_init__(self):
    if self.num_frames < 1 or self.stride <= 0 or (self.target_fps is not None and self.target_fps <= 0):
      raise ValueError(f"a clip needs num_frames >= 1 and a positive stride / target_fps: {self}")
    if self.short not in ("loop", "pad"):
      raise ValueError(f"short must be 'loop' or 'pad', got {self.short!r}")


def clip_indices(
  video_frames: int, video_fps: float, spec: ClipSpec, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(frame indices int64 [T], valid bool [T]) of one clip; a random start with `rng`, centred without."""
  if video_frames < 1:
    raise ValueError("a clip needs a video with at least one frame")
  step = spec.stride
  if spec.target_fps is not None:
    if video_fps <= 0:
      raise ValueError("target_fps needs the video's fps, and it is unknown (0)")
    step = video_fps / spec.target_fps
  # The frame showing at each clip time (floor); the epsilon keeps 3 * (10 / 3) from flooring to 9.
  offsets = np.floor(np.arange(spec.num_frames) * step + 1e-6).astype(np.int64)
  span = int(offsets[-1]) + 1
  if span <= video_frames:
    room = video_frames - span
    start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
    return start + offsets, np.ones(spec.num_frames, bool)
  if spec.short == "loop":
    start = int(rng.integers(0, video_frames)) if rng is not None else 0
    return (start + offsets) % video_frames, np.ones(spec.num_frames, bool)
  return np.minimum(offsets, video_frames - 1), offsets < video_frames


def crop_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator | None = None) -> tuple[int, int]:
  """(top, left) of a crop of size `crop` = (h, w): random with `rng`, centred without."""
  ch, cw = crop
  if ch > height or cw > width:
    raise ValueError(f"crop {crop} is larger than the frames ({height}, {width})")
  if rng is None:
    return (height - ch) // 2, (width - cw) // 2
  return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))


@dataclasses.dataclass(frozen=True)
class ClipSampler:
  """One example's frames from a video file; picklable, so it can be a grain transform as it is.

  Training example `index` of a run seeded `seed`: `sampler(path, np.random.default_rng((seed, index)))`,
  the same clip and crop on every run and in any worker; evaluation: `sampler(path)`, centred.

  `width` / `height` resize at decode (see `VideoReader`); `crop` = (h, w) then cuts a host-side crop, so
  the host ships only the pixels the device will use. `num_threads=1` suits loader workers, which are
  already one per core.
  """

  clip: ClipSpec
  crop: tuple[int, int] | None = None
  width: int = -1
  height: int = -1
  mode: str = "stream"
  backend: str = "decord"
  num_threads: int = 1

  def __call__(self, path: str, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """{"frames": uint8 [T, H, W, 3], "valid": bool [T]}: random clip and crop with `rng`, centred without."""
    with VideoReader(
      path, mode=self.mode, width=self.width, height=self.height, num_threads=self.num_threads, backend=self.backend
    ) as reader:
      indices, valid = clip_indices(reader.num_frames, reader.fps, self.clip, rng)
      frames = reader.read_frames(indices)
    if self.crop is not None:
      try:
        top, left = crop_box(frames.shape[1], frames.shape[2], self.crop, rng)
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
      frames = np.ascontiguousarray(frames[:, top : top + self.crop[0], left : left + self.crop[1]])
    return {"frames": frames, "valid": valid}

"""Synthetic captioned videos made with PyAV: a coloured shape moves across a plain background.

Captions say what moves where ("a red square moves left"), so a video-to-text model has something to learn
with nothing downloaded. The videos are real H.264 mp4 files, read back by the same decoders as a real
dataset's. Video i is a pure function of (seed, i).
"""

from __future__ import annotations

import csv
import os

import numpy as np

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 200, 60),
  "blue": (50, 80, 230),
  "yellow": (230, 210, 40),
  "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_BACKGROUND = (30, 30, 30)


def encode_video(path: str, frames: np.ndarray, fps: int, codec: str = "libx264", options=None) -> str:
  """Writes uint8 RGB frames [T, H, W, 3] (H and W even) to `path`; the container follows the file's suffix.

  `options` go to the encoder (e.g. {"crf": "18"}). libx264 runs single-threaded: by default its thread count
  follows the machine's cores and its output follows the thread count, so the same video would differ between
  machines.
  """
  import av  # pylint: disable=import-outside-toplevel

  t, h, w, _ = frames.shape
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    opts = {"threads": "1"} if codec == "libx264" else {}
    opts.update(options or {})
    stream.options = opts
    for i in range(t):
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():  # flush the encoder's delayed frames
      container.mux(packet)
  return path


def _shape_mask(shape: str, size: int) -> np.ndarray:
  """A boolean [size, size] stamp of the shape."""
  y, x = np.mgrid[0:size, 0:size] + 0.5
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 2) ** 2
  return np.abs(x - size / 2) <= y / 2  # a triangle pointing up: wider row by row


def synthetic_clip(rng: np.random.Generator, num_frames: int, size: int) -> tuple[np.ndarray, str]:
  """uint8 frames [T, size, size, 3] of one moving shape, and the caption that says what moved where."""
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
  side = size // 4
  dy, dx = DIRECTIONS[direction]
  # The shape crosses most of the frame along its direction, from a random place across it.
  travel = size - side
  start = np.array([rng.integers(0, travel + 1), rng.integers(0, travel + 1)])
  along = 0 if dy else 1
  start[along] = travel if (dy, dx)[along] < 0 else 0
  mask = _shape_mask(shape, side)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  frames[:] = _BACKGROUND
  for t in range(num_frames):
    step = round(travel * t / max(num_frames - 1, 1))
    y0, x0 = start + step * np.array([dy, dx])
    patch = frames[t, y0 : y0 + side, x0 : x0 + side]
    patch[mask] = COLOURS[colour]
  return frames, f"a {colour} {shape} moves {direction}"


def make_synthetic_videos(
  out_dir: str,
  n: int,
  seed: int = 0,
  num_frames: int = 16,
  size: int = 64,
  fps: int = 8,
  annotations: str = "annotations.csv",
) -> str:
  """Writes n videos to out_dir/videos/ and their `path,caption` annotations; returns the annotations' path.

  Paths in the annotation file are relative to out_dir (the dataset's root). Files already present are kept,
  so a second call with the same arguments costs only the annotations.
  """
  os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
  rows = []
  for i in range(n):
    frames, caption = synthetic_clip(np.random.default_rng([seed, i]), num_frames, size)
    rel = os.path.join("videos", f"{i:06d}.mp4")
    path = os.path.join(out_dir, rel)
    if not os.path.exists(path):
      encode_video(path + ".tmp.mp4", frames, fps)
      os.replace(path + ".tmp.mp4", path)  # a killed run leaves no half-written video behind
    rows.append((rel, caption))
  ann = os.path.join(out_dir, annotations)
  with open(ann, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("path", "caption"))
    writer.writerows(rows)
  return ann

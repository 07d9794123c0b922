"""Video reading, clip sampling from files and the video index, on real files encoded here with PyAV.

Each test video draws its frame number into the pixels, in binary: 7 big blocks, each bright or dark, which
survive lossy compression and resizing. Decoding a returned frame's blocks tells which frame it is.
"""

import json
import os
import pickle

import av
import numpy as np
import pytest

import faults
from t5jax.data import guarded, video_index
from t5jax.data.video import ClipSampler, ClipSpec, VideoReader, VideoReadError, clip_indices, crop_box
from t5jax.data.video_synthetic import COLOURS, DIRECTIONS, SHAPES, encode_video, make_synthetic_videos

BITS = 7  # frame numbers up to 127
NUM_FRAMES, FPS, HEIGHT, WIDTH = 60, 10, 64, 96
RESIZED = (48, 32)  # (width, height); 48 is a width at which decord returns padded rows (see video.py)
# decord and PyAV both convert with FFmpeg's swscale. At full size they agree exactly on these files (0 on
# every pixel). Resized (96x64 -> 48x32, both bicubic) they differ on block edges: measured mean 0.51, max 11
# levels of 255 (decord2 scales in its filter graph, PyAV in one swscale call with the colour conversion).
# (mean, max) allowed, in levels of 255:
AGREE = {None: (0.0, 0), RESIZED: (1.0, 16)}
# (file suffix, encoder): what PyAV's build encodes and both backends read.
FORMATS = [(".mp4", "libx264"), (".avi", "mpeg4"), (".webm", "libvpx-vp9"), (".mkv", "libx264")]
BACKENDS = ["decord", "pyav"]


def numbered_frames(n, height=HEIGHT, width=WIDTH):
  """uint8 [n, H, W, 3]: frame i shows i in binary, a bright coloured block per 1 bit, a dark one per 0."""
  frames = np.zeros((n, height, width, 3), np.uint8)
  for i in range(n):
    for b in range(BITS):
      r, c = divmod(b, 4)
      colour = (235, 90 + 20 * b, 255 - 25 * b) if (i >> b) & 1 else (20, 20, 20)
      frames[i, r * height // 2 : (r + 1) * height // 2, c * width // 4 : (c + 1) * width // 4] = colour
  return frames


def frame_numbers(frames):
  """The frame numbers drawn into THWC frames, read from the centre of each block."""
  _, h, w, _ = frames.shape
  numbers = np.zeros(len(frames), np.int64)
  for b in range(BITS):
    r, c = divmod(b, 4)
    block = frames[
      :, r * h // 2 + h // 8 : (r + 1) * h // 2 - h // 8, c * w // 4 + w // 16 : (c + 1) * w // 4 - w // 16
    ]
    numbers |= (block.mean(axis=(1, 2, 3)) > 100).astype(np.int64) << b
  return numbers


def has_encoder(name):
  try:
    av.codec.Codec(name, "w")
    return True
  except Exception:  # PyAV raises its own UnknownCodecError
    return False


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """{suffix: path} of the numbered video in each container the encoders allow, plus a 10-frame one."""
  root = tmp_path_factory.mktemp("videos")
  paths = {}
  for suffix, codec in FORMATS:
    if has_encoder(codec):
      # A keyframe every 12 frames in the mp4, so reads cross groups of pictures (seeks) and stay in one.
      options = {"g": "12"} if suffix == ".mp4" else None
      paths[suffix] = encode_video(str(root / f"numbered{suffix}"), numbered_frames(NUM_FRAMES), FPS, codec, options)
  paths["short"] = encode_video(str(root / "short.mp4"), numbered_frames(10), FPS)
  return paths


# --- Readers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["seek", "stream"])
@pytest.mark.parametrize("output_format", ["THWC", "TCHW"])
@pytest.mark.parametrize("resize", [None, RESIZED])
def test_frames_are_the_ones_asked_for(videos, backend, mode, output_format, resize):
  width, height = resize or (-1, -1)
  indices = [5, 3, 3, 59, 0, 30, 31, 58]  # out of order, a repeat, both ends
  with VideoReader(
    videos[".mp4"], mode=mode, output_format=output_format, width=width, height=height, backend=backend
  ) as reader:
    assert (reader.num_frames, reader.fps) == (NUM_FRAMES, FPS)
    h, w = (height, width) if resize else (HEIGHT, WIDTH)
    assert reader.size == (h, w)
    frames = reader.read_frames(indices)
  assert frames.dtype == np.uint8
  assert frames.shape == ((8, h, w, 3) if output_format == "THWC" else (8, 3, h, w))
  thwc = frames if output_format == "THWC" else frames.transpose(0, 2, 3, 1)
  assert frame_numbers(thwc).tolist() == indices


@pytest.mark.parametrize("suffix", [s for s, _ in FORMATS])
def test_containers_and_codecs_read_alike(videos, suffix):
  if suffix not in videos:
    pytest.skip(f"PyAV's build has no encoder for {suffix}")
  indices = list(range(0, NUM_FRAMES, 7)) + [NUM_FRAMES - 1]
  for backend in BACKENDS:
    for mode in ("seek", "stream"):
      reader = VideoReader(videos[suffix], mode=mode, backend=backend, width=RESIZED[0], height=RESIZED[1])
      assert reader.num_frames == NUM_FRAMES
      assert frame_numbers(reader.read_frames(indices)).tolist() == indices, (backend, mode)


@pytest.mark.parametrize("resize", [None, RESIZED])
def test_decord_and_pyav_agree(videos, resize):
  width, height = resize or (-1, -1)
  for path in (p for k, p in videos.items() if k != "short"):
    got = [
      VideoReader(path, backend=b, width=width, height=height).read_frames(range(NUM_FRAMES)).astype(int)
      for b in BACKENDS
    ]
    diff = np.abs(got[0] - got[1])
    assert diff.mean() <= AGREE[resize][0] and diff.max() <= AGREE[resize][1], (path, diff.mean(), diff.max())


@pytest.mark.parametrize("mode", ["seek", "stream"])
def test_widths_whose_rows_decord_pads_come_back_whole(videos, mode):
  # Rows of 3 * width bytes that are not a multiple of 64: decord pads them, and returns some as 4 or 6
  # channels (16, 24, 72) and the others as 3 (odd ones among them). Each must be the picture PyAV gives.
  indices = [0, 13, 14, 40]
  for width in (16, 24, 30, 33, 47, 72, 97, 130):
    got = [
      VideoReader(videos[".mp4"], mode=mode, backend=b, width=width, height=31).read_frames(indices).astype(int)
      for b in BACKENDS
    ]
    assert got[0].shape == (4, 31, width, 3) and frame_numbers(got[0]).tolist() == indices, width
    # Rows that came back skewed would differ everywhere; at block edges that fall between output pixels (31
    # rows, widths like 47) the two scalers round apart by up to 30 levels (measured), so only the mean is tight.
    diff = np.abs(got[0] - got[1])
    assert diff.mean() <= AGREE[RESIZED][0] and diff.max() <= 32, (width, diff.mean(), diff.max())


@pytest.fixture(scope="module")
def b_frame_videos(tmp_path_factory):
  """Two 120-frame numbered videos with 3 B-frames between references: a keyframe every 50 frames, and one
  keyframe only (a GOP of 250, longer than the video). No scene-cut keyframes, so seeks must cross GOPs."""
  root, paths = tmp_path_factory.mktemp("b_frames"), []
  for gop in (50, 250):
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3:b-adapt=0"
    path = encode_video(str(root / f"gop{gop}.mp4"), numbered_frames(120), FPS, options={"x264-params": params})
    with av.open(path) as container:
      frames = list(container.decode(video=0))
    assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, 120, gop))
    assert sum(f.pict_type == av.video.frame.PictureType.B for f in frames) > 60
    paths.append(path)
  return paths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["seek", "stream"])
def test_random_access_across_gops_gives_the_frames_of_a_sequential_decode(b_frame_videos, backend, mode):
  # decord 0.6 users report wrong frames after seeks (dmlc/decord #91, #195, #365): a random order of single
  # reads (each a seek, backwards too) and one batch, against PyAV decoding the file front to back, exactly.
  order = np.random.default_rng(0).permutation(120)[:40]
  for path in b_frame_videos:
    with av.open(path) as container:
      sequential = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with VideoReader(path, mode=mode, backend=backend) as reader:
      one_by_one = np.stack([reader.read_frames([i])[0] for i in order])
      batch = reader.read_frames(order)
    assert frame_numbers(one_by_one).tolist() == order.tolist(), path
    np.testing.assert_array_equal(one_by_one, sequential[order])
    np.testing.assert_array_equal(batch, sequential[order])


def test_one_given_side_keeps_the_aspect_ratio(videos):
  assert VideoReader(videos[".mp4"], width=48).size == (32, 48)
  assert VideoReader(videos[".mp4"], height=32, backend="pyav").size == (32, 48)


def test_a_pickled_reader_reopens_its_file(videos):
  reader = VideoReader(videos[".mp4"], mode="seek")
  reader.read_frames([1])
  clone = pickle.loads(pickle.dumps(reader))
  assert frame_numbers(clone.read_frames([7, 2])).tolist() == [7, 2]


def test_indices_out_of_range_name_the_file(videos):
  with pytest.raises(IndexError, match="numbered.mp4"):
    VideoReader(videos[".mp4"]).read_frames([NUM_FRAMES])


def bad_files(tmp_path, good_path):
  data = open(good_path, "rb").read()
  files = {"truncated": data[: len(data) // 2], "zero_byte": b"", "text": b"this is not a video\n" * 50}
  paths = {}
  for name, content in files.items():
    paths[name] = str(tmp_path / f"{name}.mp4")
    with open(paths[name], "wb") as f:
      f.write(content)
  paths["missing"] = str(tmp_path / "missing.mp4")
  return paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_an_error_naming_the_file(tmp_path, videos, backend):
  for path in bad_files(tmp_path, videos[".mp4"]).values():
    with pytest.raises(VideoReadError, match=os.path.basename(path)):
      VideoReader(path, backend=backend).read_frames([0])


# --- Clips ----------------------------------------------------------------------------------------------


def rng(seed):
  """A training clip's rng, or None (evaluation: centred)."""
  return None if seed is None else np.random.default_rng(seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_sampler_reads_the_sampled_frames_and_crops_them(videos, backend):
  spec = ClipSpec(num_frames=6, stride=3)
  sampler = pickle.loads(pickle.dumps(ClipSampler(spec, crop=(48, 64), backend=backend)))  # as grain ships it
  for seed in (None, 11):
    out = sampler(videos[".mp4"], rng(seed))
    assert out["frames"].shape == (6, 48, 64, 3) and out["valid"].all()
    # The same draws by hand: the clip first, then the crop box, from one rng.
    expected_rng = rng(seed)
    want, _ = clip_indices(NUM_FRAMES, FPS, spec, expected_rng)
    top, left = crop_box(HEIGHT, WIDTH, (48, 64), expected_rng)
    full = ClipSampler(spec, backend=backend)(videos[".mp4"], rng(seed))["frames"]
    assert frame_numbers(full).tolist() == want.tolist()
    assert (out["frames"] == full[:, top : top + 48, left : left + 64]).all()


def test_clip_sampler_on_a_short_video_pads_and_marks_the_padding(videos):
  out = ClipSampler(ClipSpec(num_frames=16, short="pad"))(videos["short"])
  assert frame_numbers(out["frames"]).tolist() == list(range(10)) + [9] * 6
  assert out["valid"].sum() == 10
  out = ClipSampler(ClipSpec(num_frames=16, short="loop"))(videos["short"])
  assert frame_numbers(out["frames"]).tolist() == list(range(10)) + list(range(6))


# --- The video index ------------------------------------------------------------------------------------


def dataset(tmp_path, videos, bad=True):
  """A root holding two good videos (and the four bad files), and a CSV annotation file listing them all."""
  root = tmp_path / "root"
  root.mkdir()
  rows = []
  for name in ("numbered.mp4", "short.mp4"):
    os.symlink(videos[".mp4" if name == "numbered.mp4" else "short"], root / name)
    rows.append((name, f"caption of {name}"))
  if bad:
    rows += [(os.path.basename(p), "bad") for p in bad_files(root, videos[".mp4"]).values()]
  annotations = tmp_path / "annotations.csv"
  annotations.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
  return str(root), str(annotations)


def test_the_index_leaves_bad_files_out_counts_them_and_caches(tmp_path, videos, monkeypatch):
  root, annotations = dataset(tmp_path, videos)
  index = video_index.build_index(root, annotations, str(tmp_path / "cache"), num_workers=2)
  assert [p for p, _ in index.examples] == ["numbered.mp4", "short.mp4"]
  assert index.info["numbered.mp4"] == video_index.VideoInfo(NUM_FRAMES, FPS, HEIGHT, WIDTH)
  assert index.info["short.mp4"].num_frames == 10
  assert index.num_skipped == 4 and set(index.skipped) == {"truncated.mp4", "zero_byte.mp4", "text.mp4", "missing.mp4"}
  # A second build reads the cache and probes nothing.
  monkeypatch.setattr(guarded.PerThread, "call", lambda self, fn, path, backend: pytest.fail(f"probed {path}"))
  assert video_index.build_index(root, annotations, str(tmp_path / "cache")) == index


def test_a_changed_file_is_probed_again(tmp_path, videos):
  root, annotations = dataset(tmp_path, videos, bad=False)
  cache = str(tmp_path / "cache")
  assert video_index.build_index(root, annotations, cache).info["short.mp4"].num_frames == 10
  os.remove(os.path.join(root, "short.mp4"))
  encode_video(os.path.join(root, "short.mp4"), numbered_frames(12), FPS)
  assert video_index.build_index(root, annotations, cache).info["short.mp4"].num_frames == 12


def test_malformed_annotations_and_clip_specs_are_refused(tmp_path):
  headerless = tmp_path / "a.csv"
  headerless.write_text("x.mp4,a caption\n")
  with pytest.raises(ValueError, match="header"):
    video_index.read_annotations(str(headerless))
  with pytest.raises(ValueError, match="short"):
    ClipSpec(num_frames=4, short="wrap")
  with pytest.raises(ValueError, match="num_frames"):
    ClipSpec(num_frames=0)


def test_jsonl_annotations(tmp_path, videos):
  root, _ = dataset(tmp_path, videos, bad=False)
  path = tmp_path / "annotations.jsonl"
  path.write_text("".join(json.dumps({"path": "short.mp4", "caption": c}) + "\n" for c in ("one", "two")))
  index = video_index.build_index(root, str(path), str(tmp_path / "cache"), backend="pyav")
  assert index.examples == [("short.mp4", "one"), ("short.mp4", "two")] and index.num_skipped == 0


def test_a_dataset_of_only_bad_files_is_a_one_line_error(tmp_path, videos):
  root = tmp_path / "root"
  root.mkdir()
  names = [os.path.basename(p) for p in bad_files(root, videos[".mp4"]).values()]
  annotations = tmp_path / "a.csv"
  annotations.write_text("path,caption\n" + "".join(f"{n},x\n" for n in names))
  with pytest.raises(ValueError, match="no readable video: all 4") as error:
    video_index.build_index(str(root), str(annotations), str(tmp_path / "cache"))
  assert "\n" not in str(error.value)


def test_a_call_that_hangs_or_crashes_its_process_costs_only_that_call(videos):
  child = guarded.ChildProcess(timeout=2)
  with pytest.raises(guarded.CallFailed, match="hung"):
    child.call(faults.hang)
  with pytest.raises(guarded.CallFailed, match="crashed \\(signal 11\\)"):
    child.call(faults.segfault)
  assert child.pid is None  # the crashed process is gone; the next call starts another
  assert child.call(video_index.probe_file, videos[".mp4"], "decord")["num_frames"] == NUM_FRAMES
  first = child.pid
  assert child.call(video_index.probe_file, videos[".mp4"], "decord")["num_frames"] == NUM_FRAMES
  assert child.pid == first  # a process that answers is kept
  with pytest.raises(guarded.CallFailed, match="no frame indices"):  # an exception comes back as it is
    child.call(VideoReader(videos[".mp4"]).read_frames, [])
  child.close()
  assert child.pid is None and not os.path.exists(f"/proc/{first}")


# --- Synthetic videos -----------------------------------------------------------------------------------


def test_synthetic_videos_are_readable_and_captioned(tmp_path):
  annotations = make_synthetic_videos(str(tmp_path), n=6, seed=3, num_frames=8, size=32)
  rows = video_index.read_annotations(annotations)
  assert len(rows) == 6 and rows == video_index.read_annotations(
    make_synthetic_videos(str(tmp_path / "again"), n=6, seed=3, num_frames=8, size=32)
  )
  for path, caption in rows:
    _, colour, shape, _, direction = caption.split()
    assert colour in COLOURS and shape in SHAPES and direction in DIRECTIONS
    frames = VideoReader(os.path.join(tmp_path, path), backend="decord").read_frames(range(8))
    assert frames.shape == (8, 32, 32, 3)
    # The shape's centre of mass (bright pixels) moves the way the caption says.
    bright = frames.astype(int).sum(-1) > 200
    ys, xs = [np.array([np.nonzero(b)[axis].mean() for b in bright[[0, -1]]]) for axis in (0, 1)]
    dy, dx = DIRECTIONS[direction]
    assert np.sign(np.round(ys[1] - ys[0])) == dy and np.sign(np.round(xs[1] - xs[0])) == dx, caption

"""A clip read cannot stop a run: a video that hangs the decoder, one that crashes it (SIGSEGV) and one whose
middle is damaged (it passes the index's probe, then fails at read) sit among good videos; training goes on
past all three, each replaced by the next video by index and counted in metrics.jsonl, in loader threads and
in grain worker processes alike, and no reader process outlives the run, even one whose trainer is killed."""

import csv
import json
import os
import shutil

import av
import numpy as np
import psutil
import pytest

import faults
from conftest import ROOT, start_until_step, train_command
from configs import video as video_config
from t5jax import train
from t5jax.data import loader, pipeline, video_dataset
from t5jax.data.video_synthetic import encode_video, make_synthetic_videos, synthetic_clip

BAD = ("hang_0.mp4", "crash_1.mp4", "damaged_1.mp4")  # names the held-out hash leaves in training


def damaged_video(path, seed=0):
  """128 frames in groups of 8 whose packets of frames 24..103 are random bytes: its first and last frames (all
  that the index probes) decode, and any clip spanning 57 frames meets the damage. (decord decodes ahead of the
  frame asked for: with damage from frame 8 on, its probe of frame 0 failed now and then.)"""
  good = path + ".good.mp4"
  encode_video(good, synthetic_clip(np.random.default_rng(seed), 128, 64)[0], 8, options={"g": "8"})
  with av.open(good) as container:
    stream = container.streams.video[0]
    packets = [(p.pos, p.size, p.is_keyframe) for p in container.demux(stream) if p.size]
  keys = [i for i, (_, _, key) in enumerate(packets) if key]
  data, rng = bytearray(open(good, "rb").read()), np.random.default_rng(seed)
  for pos, size, _ in packets[keys[3] : keys[-3]]:
    data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """20 training videos (17 good, the 3 bad of BAD) and some held out, with their annotation file."""
  root = str(tmp_path_factory.mktemp("videos"))
  annotations = make_synthetic_videos(root, 21, seed=0)
  with open(annotations, newline="") as f:
    rows = [(r["path"], r["caption"]) for r in csv.DictReader(f)]
  good = os.path.join(root, rows[0][0])
  shutil.copy(good, os.path.join(root, BAD[0]))
  shutil.copy(good, os.path.join(root, BAD[1]))
  damaged_video(os.path.join(root, BAD[2]))
  rows = rows[:6] + [(BAD[0], rows[0][1])] + rows[6:12] + [(BAD[1], rows[0][1])] + rows[12:] + [(BAD[2], rows[0][1])]
  with open(annotations, "w", newline="") as f:
    csv.writer(f).writerows([("path", "caption"), *rows])
  held_out = [p for p, _ in rows if video_dataset.is_held_out(p, 0.25)]
  assert not set(BAD) & set(held_out) and len(rows) - len(held_out) == 20, held_out
  assert [p for p, _ in rows if p not in held_out].index(BAD[1]) > 6  # no bad video is another's replacement
  return root, annotations


def guarded_config(root, annotations, num_workers):
  c = video_config.get_config()
  c.update(total_steps=5, batch_size=4, log_every=1, eval_every=5, eval_steps=1, checkpoint_every=5)
  c.data.num_workers = num_workers
  # PyAV: decord decodes ahead in a thread of its own, so its probe of the damaged video sometimes meets the
  # damage and the index leaves the video out; PyAV's probe reads only the frames it asks for.
  c.data.video.backend = "pyav"
  # Clips spanning 57 frames (8, 8 apart): every clip of the damaged video meets its damage.
  c.data.video.update(
    root=root, annotations=annotations, eval_fraction=0.25, index_workers=1, read_timeout=5.0, stride=8.0
  )
  c.model.update(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
  return c


def reader_processes():
  """This process's live descendants that are reader processes (t5jax.data.guarded)."""
  found = []
  for p in psutil.Process().children(recursive=True):
    try:
      if p.status() != psutil.STATUS_ZOMBIE and "t5jax.data.guarded" in p.cmdline():
        found.append(p.pid)
    except psutil.NoSuchProcess:
      pass
  return found


@pytest.fixture
def new_readers():
  """The reader processes started since the test began: those of another test file's data, which a module
  fixture keeps alive on the same pytest worker, are not this test's."""
  before = set(reader_processes())
  return lambda: [pid for pid in reader_processes() if pid not in before]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_goes_on_past_videos_that_hang_crash_or_fail_at_read(
  folder, tmp_path, monkeypatch, num_workers, new_readers
):
  real = video_dataset.sampler_from
  monkeypatch.setattr(video_dataset, "sampler_from", lambda v: faults.FaultySampler(real(v)))
  warned = []
  monkeypatch.setattr(loader.logging, "warning", lambda message, *args: warned.append(message % args))
  monkeypatch.setattr(loader, "_warned", set())
  train.run(guarded_config(*folder, num_workers), str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  assert len(train_rows) == 5 and all(np.isfinite(r["loss"]) for r in train_rows)
  # 5 steps of 4 = one epoch of the 20 training videos: each bad one is read, fails and is replaced once.
  assert train_rows[-1]["unreadable_videos_skipped"] == 0
  assert sum(r[loader.FAILED_READS] for r in train_rows) == 3
  replaced = [m for m in warned if m.startswith("video replaced at read")]
  assert sorted(os.path.basename(m.split(": ")[1]) for m in replaced) == sorted(BAD), warned
  assert any("hung" in m for m in replaced) and any("crashed (signal 11)" in m for m in replaced)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "5")
  assert new_readers() == []


def test_a_replaced_example_is_the_same_on_every_build(folder, tmp_path, monkeypatch, new_readers):
  """The replacement of a video that fails is the next one by index, its clip a function of (seed, position):
  two builds (a run and its resume) read the same batch, and it holds the next video's caption."""
  real = video_dataset.sampler_from
  monkeypatch.setattr(video_dataset, "sampler_from", lambda v: faults.FaultySampler(real(v)))
  config = guarded_config(*folder, 0)
  config.data.video.read_timeout = 2.0
  batches = []
  for _ in range(2):
    data = pipeline.from_config(config, str(tmp_path / "cache"))
    step = next(s for s in range(5) if loader.FAILED_READS in data.train[s])
    batches.append(data.train[step])
  failed = batches[0].pop(loader.FAILED_READS)
  assert failed == batches[1].pop(loader.FAILED_READS) and len(failed) >= 1
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])
  assert new_readers() != []  # the run's readers, alive while its data is
  del data, batches
  assert new_readers() == []


def test_a_killed_trainer_leaves_no_loader_worker_or_reader_behind(folder, tmp_path):
  """SIGKILL of `python -m t5jax.train` (2 loader workers) takes its workers and their readers with it."""
  root, annotations = folder
  wd = str(tmp_path / "run")
  flags = [
    f"--config={ROOT}/configs/video.py",
    f"--config.data.video.root={root}",
    f"--config.data.video.annotations={annotations}",
    "--config.data.video.backend=pyav",
    "--config.data.video.eval_fraction=0.25",
    "--config.data.num_workers=2",
    "--config.total_steps=1000",
    "--config.log_every=1",
    "--config.batch_size=4",
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
  ]
  proc = start_until_step(train_command(wd, *flags), wd, 3)
  descendants = psutil.Process(proc.pid).children(recursive=True)
  readers = [p for p in descendants if "t5jax.data.guarded" in p.cmdline()]
  assert len(readers) >= 2 and len(descendants) > len(readers)  # readers, and the workers that started them
  proc.kill()
  proc.wait()
  _, alive = psutil.wait_procs(descendants, timeout=10)
  assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []

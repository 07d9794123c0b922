r"""Video captioning on synthetic clips (no download): a tiny VideoT5 learns "a red square moves left".

  python -m t5jax.train --config=configs/video.py --workdir=/tmp/t5jax_video

On the first run, `config.data.video.synthetic.count` H.264 videos of a coloured shape crossing the frame are
made with PyAV and cached (with their index and caption tokenizer) in the workdir. Clips of 8 frames, 2 apart,
resized to 48x48 at decode, become 4 x 6 x 6 = 144 encoder tokens (tubelets of 2 x 8 x 8). At 32x32 the
shapes (8 pixels across) were too small to tell apart: 87.1% exact match after 600 steps, against 96.6%
here (112 of 116 held-out captions after the default 500 steps; `python -m t5jax.evaluate --workdir=DIR`).

Your own data: a folder of videos and a `path,caption` CSV (or JSONL) of paths relative to it:
  --config.data.video.root=/data/clips --config.data.video.annotations=/data/clips/captions.csv
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.update(total_steps=500, batch_size=32, log_every=50, eval_every=250, eval_steps=2, checkpoint_every=250)

  c.data.kind = "video"
  c.data.video = video_data_config()
  c.data.targets_length = 32  # the caption tokenizer of so few captions is character-level: 29 + EOS at most
  c.data.tokenizer.spm_vocab_size = 64
  v = c.data.video
  v.num_frames, v.stride, v.size = 8, 2.0, (48, 48)
  v.synthetic.count = 1024
  # No flips: a mirrored clip moving left is captioned "right". Gentle crops and colour jitter keep the
  # shape in view and its colour nameable.
  v.augment.update(flip=False, scale=(0.7, 1.0), brightness=0.1, contrast=0.1)

  c.model.update(
    vocab_size=256, d_model=128, num_heads=4, d_kv=32, d_ff=384, num_encoder_layers=2, num_decoder_layers=2
  )
  # The front end: tubelets of 2 frames x 8 x 8 pixels, over the clips the data yields (8 frames of 48 x 48).
  c.model.video = ml_collections.ConfigDict(dict(tubelet=(2, 8, 8), frames=8, size=(48, 48), pos_embed="factorized"))
  c.optimizer.learning_rate = 0.01
  c.optimizer.warmup_steps = 50
  return c


def video_data_config():
  """`config.data.video`: a folder of videos + a `path,caption` CSV / JSONL file, or synthetic videos."""
  v = ml_collections.ConfigDict()
  v.root = placeholder(str)  # the videos' folder; None (with annotations None) = synthetic videos
  v.annotations = placeholder(str)  # CSV with a path,caption header, or JSONL {"path", "caption"}
  v.num_frames = 8  # frames per clip
  v.stride = 2.0  # source frames between clip frames
  v.short = "loop"  # a video shorter than the clip: loop | pad (padded frames are masked out)
  v.size = (64, 64)  # (h, w) frames are resized to at decode
  v.crop = placeholder(tuple)  # (h, w) host crop: random in training, centred in eval; None = whole frame
  v.mode = "stream"  # stream (decode the clip's range once) | seek (each frame on its own)
  v.backend = "decord"  # decord | pyav
  v.timeout = 30.0  # seconds the index may spend probing one file before leaving it out
  v.index_workers = 2  # probe processes of the index scan
  # Seconds one clip read may take in training and eval. Each loader thread reads in a child process of its own:
  # a read that errs, passes this or crashes the decoder is replaced by the next video by index (the same on every
  # run), counted in metrics.jsonl as videos_failed_at_read and named in a warning. 0 = read in the loader
  # itself, unguarded (a hang or crash there stops the run).
  v.read_timeout = 30.0
  v.eval_fraction = 0.1  # share of videos held out (by a hash of the path)
  v.prefix = ""  # text put before the video tokens in the encoder, e.g. "caption: "; "" = none
  v.prefix_length = 8  # tokens the prefix is padded to (a longer prefix is an error)
  # Device-side augmentation (t5jax/model/video_augment.py), drawn per example and applied to the whole clip.
  v.augment = ml_collections.ConfigDict(dict(enabled=True, scale=(0.35, 1.0), flip=True, brightness=0.2, contrast=0.2))
  v.synthetic = ml_collections.ConfigDict(dict(count=512, seed=0, num_frames=16, size=64))
  return v

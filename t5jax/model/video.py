"""Video-to-text T5: a tubelet embedding turns a clip into encoder tokens, then T5's encoder and decoder.

Params: T5's tree unchanged (so a text T5's weights load into the text part by name), plus
  video_embed/patch/kernel          [tubelet_t * tubelet_h * tubelet_w * 3, embed]
  video_embed/pos_{time,height,width}/kernel  [n_t | n_h | n_w, embed]    (video.pos_embed='factorized')
  video_embed/pos/kernel            [n_t * n_h * n_w, embed]              (video.pos_embed='learned')

The model takes the host's uint8 clips [batch, frames, height, width, 3]: converting, normalizing and (in
training) augmenting them happens here, inside the jitted step, so the host ships a quarter of float32's bytes.
Optionally also a frame mask (a short clip's padded frames are masked out of attention, tubelet by tubelet)
and a text prefix (e.g. "caption: ", embedded with T5's token table and put before the video tokens).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5jax.model import video_augment
from t5jax.model.config import T5Config
from t5jax.model.layers import DenseGeneral, Kernel
from t5jax.model.t5 import EMBED_AXES, T5

# The batch features VideoT5 reads, named as its arguments: uint8 clips, which frames are real, a text prefix.
INPUTS = ("frames", "frame_mask", "prefix_tokens")
POS_STD = 0.02  # ViT's position-embedding init: small next to the unit-variance patch embeddings


def token_grid(config: T5Config) -> tuple[int, int, int]:
  """(n_t, n_h, n_w): tubelets along time, height and width of the model's clips."""
  (t, h, w), (pt, ph, pw) = (config.video.frames, *config.video.size), config.video.tubelet
  return t // pt, h // ph, w // pw


class TubeletEmbed(nn.Module):
  """Float clips [batch, T, H, W, 3] -> tokens [batch, n_t * n_h * n_w, embed], time-major (ViViT's tubelets:
  a linear map of each non-overlapping t x h x w block, plus a position embedding)."""

  config: T5Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    b, t, h, w, c = x.shape
    pt, ph, pw = cfg.video.tubelet
    nt, nh, nw = token_grid(cfg)
    assert (t, h, w) == (cfg.video.frames, *cfg.video.size), f"clips {x.shape[1:4]} != T5Config video shape"
    x = x.reshape(b, nt, pt, nh, ph, nw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, nt, nh, nw, pt * ph * pw * c)
    # std fan_in**-0.5: unit-variance tokens from normalized pixels, as T5's token embeddings (std 1.0).
    x = DenseGeneral(
      cfg.d_model,
      ("patch", "embed"),
      (pt * ph * pw * c) ** -0.5,
      dtype=cfg.compute_dtype,
      lora_dropout=cfg.lora_dropout,
      name="patch",
    )(x)
    if cfg.video.pos_embed == "factorized":  # n_t + n_h + n_w vectors: fewer params, any grid learns faster
      pos = (
        Kernel((nt, cfg.d_model), ("video_time", "embed"), POS_STD, name="pos_time")()[:, None, None]
        + Kernel((nh, cfg.d_model), ("video_height", "embed"), POS_STD, name="pos_height")()[None, :, None]
        + Kernel((nw, cfg.d_model), ("video_width", "embed"), POS_STD, name="pos_width")()[None, None]
      )
    else:
      pos = Kernel((nt * nh * nw, cfg.d_model), ("video_tokens", "embed"), POS_STD, name="pos")()
      pos = pos.reshape(nt, nh, nw, cfg.d_model)
    x = x + pos.astype(x.dtype)
    return nn.with_logical_constraint(x.reshape(b, nt * nh * nw, cfg.d_model), EMBED_AXES)


class VideoT5(T5):
  """T5 whose encoder reads a clip: `model.apply({"params": p}, frames uint8, decoder_input_ids)`.

  `augment`: the training augmentation (random resized crop, flip, colour jitter; see video_augment.py), drawn
  per example from the 'dropout' rng, which the train step always passes and evaluation and decoding never
  do; without that rng, or with augment None, clips are only resized and normalized.
  """

  augment: video_augment.AugmentConfig | None = None
  OPTIONAL_INPUTS = INPUTS[1:]

  @classmethod
  def batch_inputs(cls, batch):
    kwargs = {k: batch[k] for k in cls.OPTIONAL_INPUTS if k in batch}
    return (batch["frames"], batch["decoder_input_tokens"]), kwargs

  def example_inputs(self, batch=1, enc_len=8, dec_len=8):
    """uint8 zeros shaped like the model's clips (their length is the config's, not `enc_len`) + decoder ids."""
    del enc_len
    frames = jnp.zeros((batch, self.config.video.frames, *self.config.video.size, 3), jnp.uint8)
    return frames, jnp.ones((batch, dec_len), jnp.int32)

  def setup(self):
    super().setup()
    self.video_embed = TubeletEmbed(self.config)

  def preprocess(self, frames, frame_mask=None):
    """uint8 [batch, T, H, W, 3] -> normalized float32 [batch, T, *video_size, 3].

    frame_mask [batch, T] (True = a real frame): padded frames become black before the augmentation (whose
    contrast pivots on the clip's mean) and 0 after normalization, so nothing of their content gets through.
    """
    size = tuple(self.config.video.size)
    if frame_mask is not None:
      frames = jnp.where(frame_mask[:, :, None, None, None], frames, jnp.zeros((), frames.dtype))
    if self.augment is not None and self.has_rng("dropout"):
      rngs = jax.random.split(self.make_rng("dropout"), frames.shape[0])
      x = video_augment.preprocess(frames, self.augment, rngs)
    else:
      x = video_augment.preprocess(frames, self.augment or video_augment.AugmentConfig(size=size))
    return x if frame_mask is None else jnp.where(frame_mask[:, :, None, None, None], x, 0.0)

  def encode_video(self, frames, deterministic=True, frame_mask=None, prefix_tokens=None):
    """uint8 clips -> (encodings [batch, tokens, embed], mask [batch, tokens]).

    frame_mask [batch, T]: a tubelet with no real frame is masked out of attention (a short clip's padding).
    prefix_tokens [batch, P] int32 (0 = padding): a text prefix such as "caption: ", embedded with the
    shared token table and put before the video tokens.
    """
    x = self.video_embed(self.preprocess(frames, frame_mask).astype(self.config.compute_dtype))
    mask = jnp.ones(x.shape[:2], bool)
    if frame_mask is not None:
      nt, nh, nw = token_grid(self.config)
      tubelet_real = frame_mask.reshape(frame_mask.shape[0], nt, -1).any(axis=-1)
      mask = jnp.repeat(tubelet_real, nh * nw, axis=1)  # tokens are time-major
    if prefix_tokens is not None:
      text = nn.with_logical_constraint(self.shared_embedding(prefix_tokens), EMBED_AXES)
      x = jnp.concatenate([text.astype(x.dtype), x], axis=1)
      mask = jnp.concatenate([prefix_tokens != 0, mask], axis=1)
    return self.encoder(x, mask, deterministic), mask

  def __call__(
    self,
    frames,
    decoder_input_ids,
    decoder_attention_mask=None,
    deterministic=True,
    frame_mask=None,
    prefix_tokens=None,
  ):
    """uint8 clips [batch, T, H, W, 3] + [batch, dec_len] ids -> logits [batch, dec_len, vocab] float32.
    frame_mask / prefix_tokens: see `encode_video` (the batch features of the same names)."""
    encoded, mask = self.encode_video(frames, deterministic, frame_mask, prefix_tokens)
    return self.decode(encoded, mask, decoder_input_ids, decoder_attention_mask, deterministic)


def training_model(config: T5Config, augment) -> VideoT5:
  """VideoT5 drawing the training augmentation `augment` (a run's `data.video.augment` settings: enabled,
  scale, flip, brightness, contrast); with enabled False, clips are only resized and normalized."""
  if not augment["enabled"]:
    return VideoT5(config)
  settings = {k: tuple(augment[k]) if k == "scale" else augment[k] for k in ("scale", "flip", "brightness", "contrast")}
  return VideoT5(config, augment=video_augment.AugmentConfig(size=tuple(config.video.size), **settings))


def greedy_captions(model: VideoT5, params, inputs: dict, length: int) -> jax.Array:
  """{"frames": uint8 clips [batch, T, H, W, 3], optional "frame_mask", "prefix_tokens" (see `encode_video`)}
  -> greedy token ids [batch, length], decoding `length` steps.

  Evaluation and predict both caption with this, from the eval preprocessing (no 'dropout' rng). Recomputes
  the decoder over the tokens so far at every step instead of keeping a KV cache: captions are short, and this needs
  nothing of decode.py's text-encoder plumbing. The caller cuts each row at its first EOS.
  """
  frames = inputs["frames"]
  encoded, mask = model.apply(
    {"params": params}, frames, True, inputs.get("frame_mask"), inputs.get("prefix_tokens"), method=VideoT5.encode_video
  )

  def step(i, ids):
    shifted = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # T5 starts from id 0
    logits = model.apply({"params": params}, encoded, mask, shifted, method=VideoT5.decode)
    return ids.at[:, i].set(jnp.argmax(logits[:, i], axis=-1).astype(ids.dtype))

  return jax.lax.fori_loop(0, length, step, jnp.zeros((frames.shape[0], length), jnp.int32))

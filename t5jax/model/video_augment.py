"""Video clips on the device: augmentation and normalization inside jit, from uint8 frames.

The host ships uint8 clips [B, T, H, W, 3] (a quarter of float32's bytes); everything that makes floats runs
here. Training augmentation draws one random resized crop, one horizontal flip and one brightness / contrast
jitter per example and applies them to every frame of its clip, so motion is never distorted. Each
example's draws come from its own rng, so an example's augmentation does not depend on its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# ImageNet's channel statistics, which pretrained video encoders expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """`size` = (h, w) of the frames out. `scale`: the crop's share of the frame's area; `ratio`: its aspect
  (w / h) range; `brightness`: the largest shift in [0, 1] units; `contrast`: factors in [1 - c, 1 + c]."""

  size: tuple[int, int]
  scale: tuple[float, float] = (0.35, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  brightness: float = 0.2
  contrast: float = 0.2
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD


def _normalize(x: jax.Array, config: AugmentConfig) -> jax.Array:
  return (x - jnp.asarray(config.mean, jnp.float32)) / jnp.asarray(config.std, jnp.float32)


def _crop_resize(x: jax.Array, top, left, height, width, size) -> jax.Array:
  """The box (top, left, height, width) of every frame of x [T, H, W, C], resized to `size`.

  scale_and_translate keeps the output shape static while the box is traced, so the crop runs inside jit.
  """
  sy, sx = size[0] / height, size[1] / width
  return jax.image.scale_and_translate(
    x,
    (x.shape[0], *size, x.shape[3]),
    (1, 2),
    jnp.stack([sy, sx]),
    jnp.stack([-top * sy, -left * sx]),
    method="linear",
    antialias=True,
  )


def augment_clip(rng: jax.Array, frames: jax.Array, config: AugmentConfig) -> jax.Array:
  """One training clip: uint8 [T, H, W, 3] -> normalized float32 [T, h, w, 3], one draw for all its frames."""
  _, h, w, _ = frames.shape
  k_area, k_ratio, k_y, k_x, k_flip, k_bright, k_contrast = jax.random.split(rng, 7)
  area = h * w * jax.random.uniform(k_area, (), minval=config.scale[0], maxval=config.scale[1])
  log_ratio = jax.random.uniform(k_ratio, (), minval=jnp.log(config.ratio[0]), maxval=jnp.log(config.ratio[1]))
  crop_w = jnp.clip(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0, w)
  crop_h = jnp.clip(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0, h)
  top = jax.random.uniform(k_y, ()) * (h - crop_h)
  left = jax.random.uniform(k_x, ()) * (w - crop_w)
  x = _crop_resize(frames.astype(jnp.float32) / 255.0, top, left, crop_h, crop_w, config.size)
  if config.flip:
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, :, ::-1], x)
  # Contrast pivots on the clip's mean, one number, so every frame gets the same affine map.
  contrast = jax.random.uniform(k_contrast, (), minval=1 - config.contrast, maxval=1 + config.contrast)
  brightness = jax.random.uniform(k_bright, (), minval=-config.brightness, maxval=config.brightness)
  pivot = jnp.mean(x)
  x = jnp.clip((x - pivot) * contrast + pivot + brightness, 0.0, 1.0)
  return _normalize(x, config)


def eval_clip(frames: jax.Array, config: AugmentConfig) -> jax.Array:
  """One evaluation clip: the whole frame resized to `size` and normalized, no randomness."""
  _, h, w, _ = frames.shape
  x = _crop_resize(frames.astype(jnp.float32) / 255.0, 0.0, 0.0, float(h), float(w), config.size)
  return _normalize(x, config)


def preprocess(frames: jax.Array, config: AugmentConfig, rngs: jax.Array | None = None) -> jax.Array:
  """A batch: uint8 [B, T, H, W, 3] -> float32 [B, T, h, w, 3]; augmented with per-example `rngs` [B]
  (e.g. `jax.random.split(rng, B)`), evaluation preprocessing without. Call inside jit."""
  assert frames.ndim == 5 and frames.shape[-1] == 3, f"expected uint8 [B, T, H, W, 3], got {frames.shape}"
  if rngs is None:
    return jax.vmap(lambda f: eval_clip(f, config))(frames)
  return jax.vmap(lambda r, f: augment_clip(r, f, config))(rngs, frames)

"""Named model shapes: T5 v1.0, T5.1.1, mT5, ByT5 and Flan-T5 as published in their HF config.json files.

`get_preset(name)` returns a complete T5Config dict (every field; no moe or video group), ready for
`T5Config.from_dict` or a ConfigDict. The two tiny presets are ours, for tests and CPU runs.
"""

from t5jax.model.config import T5Config

_V10 = dict(vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True)
_V11 = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_MT5 = dict(_V11, vocab_size=250112)
_BYT5 = dict(_V11, vocab_size=384)  # 256 bytes + 3 specials, padded up


def _shape(d_model, d_ff, num_heads, num_layers, d_kv=64, num_decoder_layers=None):
  return dict(
    d_model=d_model,
    d_ff=d_ff,
    num_heads=num_heads,
    d_kv=d_kv,
    num_encoder_layers=num_layers,
    num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
  )


# T5.1.1, mT5 and Flan-T5 share one set of shapes.
_V11_SHAPES = {
  "small": _shape(512, 1024, 6, 8),
  "base": _shape(768, 2048, 12, 12),
  "large": _shape(1024, 2816, 16, 24),
  "xl": _shape(2048, 5120, 32, 24),
  "xxl": _shape(4096, 10240, 64, 24),
}

PRESETS = {
  # Tiny v1.0- and v1.1-shaped models for tests: every code path, milliseconds per step on a CPU.
  "t5-tiny": dict(_V10, vocab_size=512, **_shape(64, 128, 4, 2, d_kv=16)),
  "t5.1.1-tiny": dict(_V11, vocab_size=512, **_shape(64, 128, 4, 2, d_kv=16)),
  "t5-small": dict(_V10, **_shape(512, 2048, 8, 6)),
  "t5-base": dict(_V10, **_shape(768, 3072, 12, 12)),
  "t5-large": dict(_V10, **_shape(1024, 4096, 16, 24)),
  # 3B and 11B widen the heads (d_kv 128) rather than d_model.
  "t5-3b": dict(_V10, **_shape(1024, 16384, 32, 24, d_kv=128)),
  "t5-11b": dict(_V10, **_shape(1024, 65536, 128, 24, d_kv=128)),
  **{f"t5.1.1-{size}": dict(_V11, **shape) for size, shape in _V11_SHAPES.items()},
  **{f"mt5-{size}": dict(_MT5, **shape) for size, shape in _V11_SHAPES.items()},
  **{f"flan-t5-{size}": dict(_V11, **shape) for size, shape in _V11_SHAPES.items()},
  # ByT5 puts 3x as many layers in the encoder as in the decoder: bytes make inputs long.
  "byt5-small": dict(_BYT5, **_shape(1472, 3584, 6, 12, num_decoder_layers=4)),
  "byt5-base": dict(_BYT5, **_shape(1536, 3968, 12, 18, num_decoder_layers=6)),
  "byt5-large": dict(_BYT5, **_shape(1536, 3840, 16, 36, num_decoder_layers=12)),
  "byt5-xl": dict(_BYT5, **_shape(2560, 6720, 32, 36, num_decoder_layers=12)),
  "byt5-xxl": dict(_BYT5, **_shape(4672, 12352, 64, 36, num_decoder_layers=12)),
}


def get_preset(name):
  """The full T5Config dict for a preset name; unknown names raise a ValueError listing the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
  return T5Config(**PRESETS[name]).to_dict()

"""The T5 model configuration: one frozen dataclass, its validation, and construction from a plain dict.

Field names follow Hugging Face's `T5Config` so a `config.json` maps across by name (see presets.py).
"""

import dataclasses

import jax.numpy as jnp

FEED_FORWARD_PROJS = ("relu", "gated-gelu", "gated-silu")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shapes and switches of a T5 encoder-decoder.

  v1.0 (t5-*) is `feed_forward_proj='relu'`, `tie_word_embeddings=True`; v1.1 / mT5 / ByT5 / Flan-T5 are
  `'gated-gelu'` (tanh-approximate gelu, HF's "gelu_new") with an untied `lm_head`.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  d_kv: int = 64                     # per-head width; num_heads * d_kv need not equal d_model
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  feed_forward_proj: str = "relu"    # 'relu' | 'gated-gelu' | 'gated-silu'
  tie_word_embeddings: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "float32"             # compute dtype; parameters are always float32
  remat_policy: str = "none"         # 'none' | 'full' | 'dots': what each layer saves for the backward pass
  scan_layers: bool = False          # one nn.scan over the layers: faster compiles, params stacked on 'layers'

  @classmethod
  def from_dict(cls, d):
    """Builds a config from a mapping, rejecting keys that are not fields (a typo should not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in names:
        raise ValueError(f"unknown T5Config key {key!r}; known keys: {', '.join(sorted(names))}")
    return cls(**dict(d))

  def to_dict(self):
    return dataclasses.asdict(self)

  def validate(self):
    """Raises a one-line ValueError naming the first bad field; returns self so calls can chain."""
    if self.feed_forward_proj not in FEED_FORWARD_PROJS:
      raise ValueError(f"unknown feed_forward_proj {self.feed_forward_proj!r}; expected one of {FEED_FORWARD_PROJS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_encoder_layers",
                 "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    return self

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def is_gated(self):
    return self.feed_forward_proj.startswith("gated-")

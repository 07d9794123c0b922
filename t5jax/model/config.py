"""The T5 model configuration: one frozen dataclass, its validation, and construction from a plain dict.

Field names follow Hugging Face's `T5Config` so a `config.json` maps across by name (see presets.py).
"""

import dataclasses

import jax.numpy as jnp

FEED_FORWARD_PROJS = ("relu", "gated-gelu", "gated-silu")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
MOE_ROUTERS = ("token_choice", "expert_choice")
MOE_DISPATCHES = ("einsum", "ragged")
MOE_EXPERT_PARALLEL = ("annotations", "all_to_all")
VIDEO_POS_EMBEDS = ("factorized", "learned")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shapes and switches of a T5 encoder-decoder.

  v1.0 (t5-*) is `feed_forward_proj='relu'`, `tie_word_embeddings=True`; v1.1 / mT5 / ByT5 / Flan-T5 are
  `'gated-gelu'` (tanh-approximate gelu, HF's "gelu_new") with an untied `lm_head`.
  """

  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  feed_forward_proj: str = "relu"  # 'relu' | 'gated-gelu' | 'gated-silu'
  tie_word_embeddings: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat_policy: str = "none"  # 'none' | 'full' | 'dots': what each layer saves for the backward pass
  scan_layers: bool = False  # one nn.scan over the layers: faster compiles, params stacked on 'layers'
  # Mixture of experts (Switch / ST-MoE, see moe.py). num_experts=0 is the dense T5 and the moe_* fields are unused.
  num_experts: int = 0
  moe_router: str = "token_choice"  # 'token_choice' (top-k) | 'expert_choice' (not causal: encoder only)
  moe_top_k: int = 1  # token choice: 1 = Switch, 2 = GShard / ST-MoE
  moe_every_encoder: int = 2  # HF's sparse_step: layer i is sparse if i % N == 1 (all if N == 1); 0 = none
  moe_every_decoder: int = 2
  moe_capacity_factor_train: float = 1.25  # T5X-style capacity: factor * group tokens * top_k / experts
  moe_capacity_factor_eval: float = 2.0
  # Tokens per routing group (capacity is shared within one); the one-hot dispatch costs group_size**2 per
  # group (benchmarks/README.md, "Mixture of experts step").
  moe_group_size: int = 1024
  moe_expert_capacity: int = 0  # > 0: HF style, this many tokens per expert per sequence (factors unused)
  moe_jitter: float = 0.0  # router input noise: x * uniform(1 - j, 1 + j), in training only
  moe_balance_loss_weight: float = 0.01
  moe_z_loss_weight: float = 1e-3
  # 'einsum' (T5X's one-hot dispatch/combine) | 'ragged' (sorted tokens, jax.lax.ragged_dot); why einsum is
  # the default: moe.py's _dispatch_ragged.
  moe_dispatch: str = "einsum"
  # How experts sharded over the mesh axis `expert` get their tokens: 'annotations' (the einsum dispatch's
  # logical axes; XLA inserts the collectives) | 'all_to_all' (GShard's two all-to-alls written out in
  # shard_map, moe.py). Same outputs; annotations stay the default, as the TPU plan gives them less
  # communication at the same step (benchmarks/README.md, "Expert parallelism").
  moe_expert_parallel: str = "annotations"
  # Video front end (video.py's VideoT5): () is the text model and the video_* fields are unused.
  video_tubelet: tuple = ()  # (t, h, w) of each tubelet, e.g. (2, 16, 16)
  video_frames: int = 0  # frames per clip the model reads
  video_size: tuple = ()  # (h, w) of those frames after device-side preprocessing
  video_pos_embed: str = "factorized"  # 'factorized' (time + height + width) | 'learned' (one per token)

  @classmethod
  def from_dict(cls, d):
    """Builds a config from a mapping, rejecting keys that are not fields (a typo should not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in names:
        raise ValueError(f"unknown T5Config key {key!r}; known keys: {', '.join(sorted(names))}")
    # JSON (a run's config.json) turns tuples into lists; a frozen config keeps tuples, so it stays hashable.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

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
    for name in (
      "vocab_size",
      "d_model",
      "num_heads",
      "d_kv",
      "d_ff",
      "num_encoder_layers",
      "num_decoder_layers",
      "relative_attention_num_buckets",
      "relative_attention_max_distance",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.num_experts:
      self._validate_moe()
    if self.video_tubelet:
      self._validate_video()
    if self.scan_layers:
      for stack in ("encoder", "decoder"):
        n, block = getattr(self, f"num_{stack}_layers"), self.scan_block(stack)
        if n % block:
          raise ValueError(
            f"scan_layers scans blocks of moe_every_{stack}={block} layers, which must divide num_{stack}_layers={n}"
          )
    return self

  def _validate_moe(self):
    def fail(name, why):
      raise ValueError(f"T5Config.{name}={getattr(self, name)!r}: {why}")

    if self.num_experts < 0:
      fail("num_experts", "must be >= 0 (0 = dense)")
    if self.moe_router not in MOE_ROUTERS:
      fail("moe_router", f"expected one of {MOE_ROUTERS}")
    if self.moe_dispatch not in MOE_DISPATCHES:
      fail("moe_dispatch", f"expected one of {MOE_DISPATCHES}")
    if not 1 <= self.moe_top_k <= self.num_experts:
      fail("moe_top_k", f"must be in [1, num_experts={self.num_experts}]")
    for name in ("moe_capacity_factor_train", "moe_capacity_factor_eval", "moe_group_size"):
      if getattr(self, name) <= 0:
        fail(name, "must be positive")
    for name in (
      "moe_every_encoder",
      "moe_every_decoder",
      "moe_expert_capacity",
      "moe_jitter",
      "moe_balance_loss_weight",
      "moe_z_loss_weight",
    ):
      if getattr(self, name) < 0:
        fail(name, "must be >= 0")
    if self.moe_router == "expert_choice" and self.moe_every_decoder:
      fail("moe_router", "expert choice sees future tokens, so it cannot route the decoder; set moe_every_decoder=0")
    if self.moe_expert_parallel not in MOE_EXPERT_PARALLEL:
      fail("moe_expert_parallel", f"expected one of {MOE_EXPERT_PARALLEL}")
    if self.moe_expert_parallel == "all_to_all" and self.moe_dispatch == "ragged":
      fail("moe_expert_parallel", "the all-to-all exchanges the einsum dispatch's buffers; use moe_dispatch='einsum'")
    if self.moe_router == "expert_choice" and self.moe_dispatch == "ragged":
      fail("moe_dispatch", "the ragged dispatch serves token choice only; use 'einsum' with expert choice")

  def _validate_video(self):
    if len(self.video_tubelet) != 3 or len(self.video_size) != 2:
      raise ValueError(
        f"T5Config.video_tubelet={self.video_tubelet!r} needs (t, h, w) and video_size={self.video_size!r} needs (h, w)"
      )
    for dim, n, p in zip(
      ("video_frames", "video_size[0]", "video_size[1]"),
      (self.video_frames, *self.video_size),
      self.video_tubelet,
      strict=True,
    ):
      if p <= 0 or n <= 0 or n % p:
        raise ValueError(f"T5Config.{dim}={n} must be a positive multiple of its video_tubelet size {p}")
    if self.video_pos_embed not in VIDEO_POS_EMBEDS:
      raise ValueError(f"T5Config.video_pos_embed={self.video_pos_embed!r}: expected one of {VIDEO_POS_EMBEDS}")

  def is_sparse(self, stack, layer):
    """Whether layer `layer` (0-based) of `stack` ('encoder' | 'decoder') has an MoE FFN (HF's convention)."""
    every = getattr(self, f"moe_every_{stack}")
    return self.num_experts > 0 and every > 0 and (every == 1 or layer % every == 1)

  def scan_block(self, stack):
    """Layers per nn.scan step: one, or with MoE a block of moe_every_* layers, so every step is alike."""
    every = getattr(self, f"moe_every_{stack}")
    return every if self.num_experts > 0 and every > 1 else 1

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def is_gated(self):
    return self.feed_forward_proj.startswith("gated-")

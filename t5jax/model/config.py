"""The T5 model configuration: T5's fields, and the optional MoE and video groups, each a frozen dataclass.

Field names follow Hugging Face's `T5Config` so a `config.json` maps across by name (see presets.py). A dense
text T5 has `moe=None` and `video=None`, and its dict (`to_dict`, a run's config.json) holds neither group.
"""

import dataclasses

import jax.numpy as jnp

FEED_FORWARD_PROJS = ("relu", "gated-gelu", "gated-silu")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("dense", "blockwise")
MOE_ROUTERS = ("token_choice", "expert_choice")
MOE_DISPATCHES = ("einsum", "ragged")
MOE_EXPERT_PARALLEL = ("annotations", "all_to_all")
VIDEO_POS_EMBEDS = ("factorized", "learned")


def _fields_from(cls, d, where):
  """`cls(**d)`, rejecting keys that are not fields (a typo should not pass silently). JSON turns tuples into
  lists; a frozen config keeps tuples, so it stays hashable."""
  names = {f.name for f in dataclasses.fields(cls)}
  for key in d:
    if key not in names:
      raise ValueError(f"unknown {where} key {key!r}; known keys: {', '.join(sorted(names))}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts FFNs (Switch / ST-MoE, see moe.py) in place of some of T5's MLPs."""

  num_experts: int = 8
  router: str = "token_choice"  # 'token_choice' (top-k) | 'expert_choice' (not causal: encoder only)
  top_k: int = 1  # token choice: 1 = Switch, 2 = GShard / ST-MoE
  every_encoder: int = 2  # HF's sparse_step: layer i is sparse if i % N == 1 (all if N == 1); 0 = none
  every_decoder: int = 2
  capacity_factor_train: float = 1.25  # T5X-style capacity: factor * group tokens * top_k / experts
  capacity_factor_eval: float = 2.0
  group_size: int = 1024  # tokens per routing group, which shares a capacity; the dispatch costs its square
  expert_capacity: int = 0  # > 0: HF style, this many tokens per expert per sequence (factors unused)
  jitter: float = 0.0  # router input noise: x * uniform(1 - j, 1 + j), in training only
  balance_loss_weight: float = 0.01
  z_loss_weight: float = 1e-3
  dispatch: str = "einsum"  # 'einsum' (T5X's one-hot dispatch) | 'ragged' (sorted tokens; moe._dispatch_ragged)
  # How experts sharded over the mesh axis `expert` get their tokens: 'annotations' (the einsum dispatch's
  # logical axes; XLA inserts the collectives) | 'all_to_all' (GShard's two all-to-alls in shard_map, moe.py).
  # Annotations are the default: less communication in the TPU plan (benchmarks/README.md, "Expert parallelism").
  expert_parallel: str = "annotations"

  def validate(self):
    def fail(name, why):
      raise ValueError(f"T5Config.moe.{name}={getattr(self, name)!r}: {why}")

    if self.num_experts <= 0:
      fail("num_experts", "must be positive (a dense model has no moe group)")
    for name, known in (
      ("router", MOE_ROUTERS),
      ("dispatch", MOE_DISPATCHES),
      ("expert_parallel", MOE_EXPERT_PARALLEL),
    ):
      if getattr(self, name) not in known:
        fail(name, f"expected one of {known}")
    if not 1 <= self.top_k <= self.num_experts:
      fail("top_k", f"must be in [1, num_experts={self.num_experts}]")
    for name in ("capacity_factor_train", "capacity_factor_eval", "group_size"):
      if getattr(self, name) <= 0:
        fail(name, "must be positive")
    for name in ("every_encoder", "every_decoder", "expert_capacity", "jitter", "balance_loss_weight", "z_loss_weight"):
      if getattr(self, name) < 0:
        fail(name, "must be >= 0")
    if self.router == "expert_choice" and self.every_decoder:
      fail("router", "expert choice sees future tokens, so it cannot route the decoder; set every_decoder=0")
    if self.expert_parallel == "all_to_all" and self.dispatch == "ragged":
      fail("expert_parallel", "the all-to-all exchanges the einsum dispatch's buffers; use dispatch='einsum'")
    if self.router == "expert_choice" and self.dispatch == "ragged":
      fail("dispatch", "the ragged dispatch serves token choice only; use 'einsum' with expert choice")


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  """A video front end (video.py's VideoT5): clips of `frames` x `size`, cut into tubelets, as encoder tokens."""

  tubelet: tuple = (2, 16, 16)  # (t, h, w) of each tubelet
  frames: int = 8  # frames per clip the model reads
  size: tuple = (64, 64)  # (h, w) of those frames after device-side preprocessing
  pos_embed: str = "factorized"  # 'factorized' (time + height + width) | 'learned' (one per token)

  def validate(self):
    if len(self.tubelet) != 3 or len(self.size) != 2:
      raise ValueError(f"T5Config.video.tubelet={self.tubelet!r} needs (t, h, w) and size={self.size!r} needs (h, w)")
    for dim, n, p in zip(("frames", "size[0]", "size[1]"), (self.frames, *self.size), self.tubelet, strict=True):
      if p <= 0 or n <= 0 or n % p:
        raise ValueError(f"T5Config.video.{dim}={n} must be a positive multiple of its tubelet size {p}")
    if self.pos_embed not in VIDEO_POS_EMBEDS:
      raise ValueError(f"T5Config.video.pos_embed={self.pos_embed!r}: expected one of {VIDEO_POS_EMBEDS}")


GROUPS = {"moe": MoeConfig, "video": VideoConfig}
# Workdirs and exports written before the groups existed hold them as flat keys: num_experts and moe_* (0 experts
# was the dense model), video_* (video_tubelet () was the text model). Group -> (prefix, bare keys, switch).
_FLAT_KEYS = {"moe": ("moe_", ("num_experts",), "num_experts"), "video": ("video_", (), "tubelet")}


def _nest_flat_keys(d):
  d = dict(d)
  for group, (prefix, bare, switch) in _FLAT_KEYS.items():
    flat = {k.removeprefix(prefix): d.pop(k) for k in list(d) if k.startswith(prefix) or k in bare}
    if flat:
      d.setdefault(group, flat if flat.get(switch) else None)
  return d


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
  # Execution: how the model is computed, not what it computes (HF's config.json has none of these).
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat_policy: str = "none"  # 'none' | 'full' | 'dots': what each layer saves for the backward pass
  scan_layers: bool = False  # one nn.scan over the layers: faster compiles, params stacked on 'layers'
  # 'dense' | 'blockwise' (blockwise.py: tiles of block_q x block_k scores, never [L, L]; for long inputs)
  attention_impl: str = "dense"
  attention_block_q: int = 512
  attention_block_k: int = 512
  lora_dropout: float = 0.0  # dropout on LoRA adapters' input in a LoRA train step (setup.py sets it; lora.py)
  # Optional groups: None when unused.
  moe: MoeConfig | None = None  # sparse FFNs (moe.py)
  video: VideoConfig | None = None  # a video front end (video.py)

  @classmethod
  def from_dict(cls, d):
    """A config from a mapping (a preset, a ConfigDict's dict, a run's config.json, old or new), rejecting keys
    that are not fields. A moe group of 0 experts is the dense model (a sweep point may say so)."""
    d = _nest_flat_keys(d)
    for name, group in GROUPS.items():
      value = d.get(name)
      if value is not None and not isinstance(value, group):
        value = _fields_from(group, value, f"T5Config.{name}")
        d[name] = None if name == "moe" and value.num_experts == 0 else value
    return _fields_from(cls, d, "T5Config")

  def to_dict(self):
    """A plain dict of the fields; an unused group is left out (a text run's config.json never says video)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if not (k in GROUPS and v is None)}

  def validate(self):
    """Raises a one-line ValueError naming the first bad field; returns self so calls can chain."""
    if self.feed_forward_proj not in FEED_FORWARD_PROJS:
      raise ValueError(f"unknown feed_forward_proj {self.feed_forward_proj!r}; expected one of {FEED_FORWARD_PROJS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
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
      "attention_block_q",
      "attention_block_k",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    for name in ("dropout_rate", "lora_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"T5Config.{name} must be in [0, 1), got {getattr(self, name)}")
    for group in (self.moe, self.video):
      if group is not None:
        group.validate()
    if self.scan_layers:
      for stack in ("encoder", "decoder"):
        n, block = getattr(self, f"num_{stack}_layers"), self.scan_block(stack)
        if n % block:
          raise ValueError(
            f"scan_layers scans blocks of moe.every_{stack}={block} layers, which must divide num_{stack}_layers={n}"
          )
    return self

  @property
  def num_experts(self):
    """Experts per sparse FFN; 0 for the dense model."""
    return self.moe.num_experts if self.moe else 0

  def is_sparse(self, stack, layer):
    """Whether layer `layer` (0-based) of `stack` ('encoder' | 'decoder') has an MoE FFN (HF's convention)."""
    every = getattr(self.moe, f"every_{stack}", 0)
    return every > 0 and (every == 1 or layer % every == 1)

  def scan_block(self, stack):
    """Layers per nn.scan step: one, or with MoE a block of moe.every_* layers, so every step is alike."""
    every = getattr(self.moe, f"every_{stack}", 0)
    return every if every > 1 else 1

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def is_gated(self):
    return self.feed_forward_proj.startswith("gated-")

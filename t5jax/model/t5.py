"""The T5 encoder-decoder: pre-norm layers, the two stacks, the model and its decoding cache.

params.py builds its variables.

Param tree (unscanned; with `scan_layers` the `layers_{i}` become one `layers` with a leading 'layers' axis):
  shared_embedding/embedding                    [vocab, embed]
  encoder/relpos_bias/rel_embedding             [relpos_buckets, heads]
  encoder/layers_{i}/attention_norm/scale       [embed]
  encoder/layers_{i}/attention/{query,key,value}/kernel [embed, heads, kv];  .../out/kernel [heads, kv, embed]
  encoder/layers_{i}/mlp_norm/scale             [embed]
  encoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel [embed, mlp];  .../mlp/wo/kernel [mlp, embed]
  encoder/layers_{i}/mlp/... of a sparse (MoE) layer: router/kernel [embed, experts],
               experts/{wi | wi_0, wi_1} [experts, embed, mlp], experts/wo [experts, mlp, embed]  (moe.py)
  encoder/final_norm/scale                      [embed]
  decoder/...  as the encoder, each layer with self_attention_norm, self_attention, cross_attention_norm,
               cross_attention, mlp_norm, mlp
  lm_head/kernel                                [embed, vocab]   (only when embeddings are untied)

With MoE and `scan_layers`, a stack whose sparse layers come every N > 1 layers scans blocks of N layers:
`layers/layer_{j}/...` holds layers j, j + N, j + 2N, ... (see layer_stack.py).
"""

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5jax.model.attention import (
  MultiHeadAttention,
  causal_mask,
  combine_masks,
  padding_mask,
  positions_from_segments,
  segment_mask,
)
from t5jax.model import blockwise
from t5jax.model.config import T5Config
from t5jax.model.layers import MLP, DenseGeneral, Embed, RelativePositionBias, RMSNorm
from t5jax.model.moe import COLLECTIONS as MOE_COLLECTIONS, MoeMLP

EMBED_AXES = ("batch", "length", "embed")


def _dropout(config, x, deterministic):
  return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


def _attention(config, name, cross=False):
  return MultiHeadAttention(
    config.num_heads,
    config.d_kv,
    config.dropout_rate,
    config.compute_dtype,
    cross,
    lora_dropout=config.lora_dropout,
    name=name,
  )


def _norm(config, name):
  return RMSNorm(config.layer_norm_epsilon, config.compute_dtype, name=name)


def _ffn(config, sparse, x, deterministic, decode=False):
  """The layer's feed-forward block, named 'mlp': T5's MLP, or the MoE layer when `sparse`."""
  if sparse:
    return MoeMLP(config, name="mlp")(x, deterministic, decode)
  return MLP(
    config.d_ff, config.feed_forward_proj, config.dropout_rate, config.compute_dtype, config.lora_dropout, name="mlp"
  )(x, deterministic)


def _relpos_bias(config, bidirectional):
  return RelativePositionBias(
    config.relative_attention_num_buckets,
    config.relative_attention_max_distance,
    config.num_heads,
    bidirectional,
    init_std=config.d_model**-0.5,
    name="relpos_bias",
  )


class EncoderLayer(nn.Module):
  """Pre-norm self-attention then MLP (MoE if `sparse`), each added back through dropout. [batch, len, embed]
  -> same."""

  config: T5Config
  sparse: bool = False

  @nn.compact
  def __call__(self, x, mask, bias, deterministic):
    cfg = self.config
    h = _norm(cfg, "attention_norm")(x)
    h = _attention(cfg, "attention")(h, h, mask, bias, deterministic)
    x = x + _dropout(cfg, h, deterministic)
    h = _ffn(cfg, self.sparse, _norm(cfg, "mlp_norm")(x), deterministic)
    x = x + _dropout(cfg, h, deterministic)
    x = nn.with_logical_constraint(x, EMBED_AXES)
    return x


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention to the encoder, then MLP (MoE if `sparse`).
  [batch, len, embed] -> same."""

  config: T5Config
  sparse: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, bias, deterministic, decode):
    cfg = self.config
    h = _norm(cfg, "self_attention_norm")(x)
    h = _attention(cfg, "self_attention")(h, h, self_mask, bias, deterministic, decode)
    x = x + _dropout(cfg, h, deterministic)
    h = _norm(cfg, "cross_attention_norm")(x)
    # No position bias in cross-attention: encoder and decoder positions are not comparable.
    h = _attention(cfg, "cross_attention", cross=True)(h, encoded, cross_mask, None, deterministic, decode)
    x = x + _dropout(cfg, h, deterministic)
    h = _ffn(cfg, self.sparse, _norm(cfg, "mlp_norm")(x), deterministic, decode)
    x = x + _dropout(cfg, h, deterministic)
    x = nn.with_logical_constraint(x, EMBED_AXES)
    return x


# A layer's Python-bool arguments: remat must not trace them (they pick code paths).
STATIC_ARGS = ("deterministic", "decode")


def _static_argnums(layer_cls):
  """Positions of STATIC_ARGS in `layer_cls.__call__`, counting self as 0 (what nn.remat asks for)."""
  names = list(inspect.signature(layer_cls.__call__).parameters)
  return tuple(names.index(n) for n in STATIC_ARGS if n in names)


class _Block(nn.Module):
  """`len(sparse)` consecutive layers named `layer_{j}`, the step nn.scan repeats when a stack's sparse layers
  come every N > 1 layers (so every step has the same structure). [batch, len, embed] -> same."""

  config: T5Config
  layer_cls: Any
  sparse: tuple

  @nn.compact
  def __call__(self, x, *args):
    for j, sparse in enumerate(self.sparse):
      x = self.layer_cls(self.config, sparse, name=f"layer_{j}")(x, *args)
    return x


def _scan_body(module, x, *args):
  return module(x, *args), None  # nn.scan wants (carry, per-step output)


def _run_layers(cfg, stack, layer_cls, num_layers, x, *args):
  """Applies `num_layers` layers of `stack` ('encoder' | 'decoder') to x, unrolled or as one nn.scan, with
  optional remat. Layer i is sparse as `cfg.is_sparse(stack, i)` says.

  `args` are shared by every layer (masks, bias, flags).
  """
  if cfg.remat_policy != "none":
    policy = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[cfg.remat_policy]
    # Inside scan the loop boundary already stops XLA from merging recomputation away; outside it
    # prevent_cse must stay on or CSE undoes the remat.
    layer_cls = nn.remat(
      layer_cls, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=_static_argnums(layer_cls)
    )
  if cfg.scan_layers:
    block = cfg.scan_block(stack)
    sparse = tuple(cfg.is_sparse(stack, j) for j in range(block))
    # A one-layer step keeps the dense scanned layout, layers/<layer params>.
    step = layer_cls(cfg, sparse[0], name="layers") if block == 1 else _Block(cfg, layer_cls, sparse, name="layers")
    axes = {name: 0 for name in ("params", "cache", "lora") + MOE_COLLECTIONS}  # "lora": a LoRA step's adapters
    scanned = nn.scan(
      _scan_body,
      variable_axes=axes,
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers // block,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(step, x, *args)
    return x
  for i in range(num_layers):
    x = layer_cls(cfg, cfg.is_sparse(stack, i), name=f"layers_{i}")(x, *args)
  return x


class Encoder(nn.Module):
  """Embedded tokens [batch, len, embed] -> encodings [batch, len, embed] (after the final norm)."""

  config: T5Config

  @nn.compact
  def __call__(self, inputs_embeds, mask=None, deterministic=True, segment_ids=None, positions=None):
    """mask: [batch, len], nonzero = real token (None = attend everywhere). Packed rows: `segment_ids`
    [batch, len] (0 = padding, k = k-th example) confine attention to one example, and `positions`
    [batch, len] (default: derived from the segment ids) place each example's tokens from 0."""
    cfg = self.config
    x = _dropout(cfg, inputs_embeds, deterministic)
    length = x.shape[1]
    relpos = _relpos_bias(cfg, bidirectional=True)
    if cfg.attention_impl == "blockwise":  # the bias and masks made tile by tile, from these parts
      table = relpos(0, 0, table_only=True)
      attn_mask, bias = blockwise.self_pattern(cfg, table, mask, segment_ids, positions, False), None
    else:
      if positions is None and segment_ids is not None:
        positions = positions_from_segments(segment_ids)
      bias = relpos(length, length, query_positions=positions, key_positions=positions)
      attn_mask = combine_masks(
        None if mask is None else padding_mask(mask),
        None if segment_ids is None else segment_mask(segment_ids, segment_ids),
      )
    x = _run_layers(cfg, "encoder", EncoderLayer, cfg.num_encoder_layers, x, attn_mask, bias, deterministic)
    x = _norm(cfg, "final_norm")(x)
    return _dropout(cfg, x, deterministic)


class Decoder(nn.Module):
  """Embedded decoder tokens [batch, len, embed] + encodings -> hidden states [batch, len, embed].

  With `decode=True` the stack owns `cache/cache_index` (the position of the next token, for the shared
  relative-position bias) and `cache/key_positions` [max_len], whose length records the cache length
  (only its shape is read); each layer's self-attention owns its key/value cache.
  """

  config: T5Config

  @nn.compact
  def __call__(
    self,
    inputs_embeds,
    encoded,
    encoder_mask=None,
    decoder_mask=None,
    deterministic=True,
    decode=False,
    segment_ids=None,
    encoder_segment_ids=None,
    positions=None,
  ):
    """Packed rows: `segment_ids` [batch, len] and `encoder_segment_ids` [batch, enc_len] (both or neither)
    let decoder example k attend only to its own earlier tokens and to encoder example k; `positions`
    (default: derived from `segment_ids`) feed the relative position bias."""
    cfg = self.config
    if (segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError("packed decoding needs both decoder and encoder segment ids, or neither")
    if decode and segment_ids is not None:
      raise ValueError("cached decoding does not take packed (segment_ids) inputs")
    x = _dropout(cfg, inputs_embeds, deterministic)
    length = x.shape[1]
    relpos = _relpos_bias(cfg, bidirectional=False)
    blocks = cfg.attention_impl == "blockwise" and not decode  # a cached step keeps the dense form
    if decode and self.has_variable("cache", "cache_index"):
      # One cached step: the query sits at cache_index; causality comes from the attention's cache mask.
      index = self.variable("cache", "cache_index")
      max_len = self.variable("cache", "key_positions").value.shape[0]
      bias = relpos(length, max_len, query_offset=index.value)
      index.value = index.value + length
      self_mask = None
    elif blocks:
      table = relpos(0, 0, table_only=True)
      self_mask, bias = (blockwise.self_pattern(cfg, table, decoder_mask, segment_ids, positions, True), None)
    else:
      if decode:  # the initialising call: its [batch, max_len] input fixes the cache length
        self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        self.variable("cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32))
      if positions is None and segment_ids is not None:
        positions = positions_from_segments(segment_ids)
      bias = relpos(length, length, query_positions=positions, key_positions=positions)
      self_mask = combine_masks(
        causal_mask(length),
        None if decoder_mask is None else padding_mask(decoder_mask),
        None if segment_ids is None else segment_mask(segment_ids, segment_ids),
      )
    cross_mask = blockwise.cross_pattern(cfg, encoder_mask, segment_ids, encoder_segment_ids) if blocks else None
    if not blocks:
      cross_mask = combine_masks(
        None if encoder_mask is None else padding_mask(encoder_mask),
        None if segment_ids is None else segment_mask(segment_ids, encoder_segment_ids),
      )
    shared = (encoded, self_mask, cross_mask, bias, deterministic, decode)  # what every layer takes
    x = _run_layers(cfg, "decoder", DecoderLayer, cfg.num_decoder_layers, x, *shared)
    x = _norm(cfg, "final_norm")(x)
    return _dropout(cfg, x, deterministic)


class T5(nn.Module):
  """T5 encoder-decoder returning float32 logits; `model.apply({"params": p}, input_ids, decoder_input_ids)`.

  Dropout draws from the 'dropout' rng when `deterministic=False`.
  """

  config: T5Config
  # Batch features read beyond the two id tensors: a packed batch's segment ids and positions (see __call__).
  OPTIONAL_INPUTS = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")

  @classmethod
  def batch_inputs(cls, batch):
    """(args, kwargs) of `__call__` for a batch with T5X feature names (data/specs.py)."""
    kwargs = {k: batch[k] for k in cls.OPTIONAL_INPUTS if k in batch}
    return (batch["encoder_input_tokens"], batch["decoder_input_tokens"]), kwargs

  def example_inputs(self, batch=1, enc_len=8, dec_len=8):
    """Arguments of `__call__` to build the variables with (`init`)."""
    return jnp.ones((batch, enc_len), jnp.int32), jnp.ones((batch, dec_len), jnp.int32)

  def setup(self):
    cfg = self.config.validate()
    self.shared_embedding = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      # std d_model**-0.5 (T5X's fan-in init) keeps initial logits O(1) like the tied, rescaled head.
      self.lm_head = DenseGeneral(cfg.vocab_size, ("embed", "vocab"), cfg.d_model**-0.5, dtype=cfg.compute_dtype)

  def encode(self, input_ids, attention_mask=None, deterministic=True, segment_ids=None, positions=None):
    """[batch, len] ids -> [batch, len, embed]. attention_mask defaults to `input_ids != 0` (0 is padding)."""
    if attention_mask is None:
      attention_mask = input_ids != 0
    x = nn.with_logical_constraint(self.shared_embedding(input_ids), EMBED_AXES)
    return self.encoder(x, attention_mask, deterministic, segment_ids, positions)

  def decode(
    self,
    encoded,
    encoder_attention_mask,
    decoder_input_ids,
    decoder_attention_mask=None,
    deterministic=True,
    decode=False,
    decoder_segment_ids=None,
    encoder_segment_ids=None,
    decoder_positions=None,
  ):
    """encodings [batch, enc_len, embed] + [batch, dec_len] ids -> logits [batch, dec_len, vocab] float32.

    Causal masking always applies; decoder_attention_mask [batch, dec_len] additionally masks padded keys.
    With decode=True and mutable=["cache"], feeds one token per call (see `decode.init_cache`); the
    decoder_attention_mask is then ignored, and cross-attention reuses the keys/values of `encoded` cached
    by `decode.init_cache`. Segment ids / positions: see `__call__`.
    """
    cfg = self.config
    x = nn.with_logical_constraint(self.shared_embedding(decoder_input_ids), EMBED_AXES)
    h = self.decoder(
      x,
      encoded,
      encoder_attention_mask,
      decoder_attention_mask,
      deterministic,
      decode,
      decoder_segment_ids,
      encoder_segment_ids,
      decoder_positions,
    )
    if cfg.tie_word_embeddings:
      # v1.0 shares the input table (std 1.0) with the output, so the output side is rescaled here.
      logits = self.shared_embedding.attend(h * cfg.d_model**-0.5)
    else:
      logits = self.lm_head(h)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(
    self,
    input_ids,
    decoder_input_ids,
    attention_mask=None,
    decoder_attention_mask=None,
    deterministic=True,
    encoder_segment_ids=None,
    decoder_segment_ids=None,
    encoder_positions=None,
    decoder_positions=None,
  ):
    """[batch, enc_len] and [batch, dec_len] ids -> logits [batch, dec_len, vocab] float32.

    Packed examples (T5X's feature names, all int32 [batch, len]): `*_segment_ids` number the examples of a
    row from 1 (0 = padding); attention stays within an example, decoder example k reading encoder example k.
    `*_positions` restart at 0 per example (derived from the segment ids when omitted) and drive the
    relative position bias, so a packed example gets the logits it gets alone.
    """
    if attention_mask is None:
      attention_mask = input_ids != 0
    encoded = self.encode(input_ids, attention_mask, deterministic, encoder_segment_ids, encoder_positions)
    return self.decode(
      encoded,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask,
      deterministic,
      False,
      decoder_segment_ids,
      encoder_segment_ids,
      decoder_positions,
    )

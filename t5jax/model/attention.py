"""T5 multi-head attention, its masks, and the decoder's key/value cache for step-by-step decoding.

Masks are boolean and broadcast against logits [batch, heads, q_len, k_len]: True = may attend.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5jax.model import blockwise
from t5jax.model.layers import DenseGeneral

Dtype = Any


def padding_mask(kv_mask):
  """[batch, k_len] (nonzero = real token) -> [batch, 1, 1, k_len]. Masks keys only, as HF T5 does."""
  return (kv_mask != 0)[:, None, None, :]


def causal_mask(length):
  """[1, 1, length, length]: query i may attend to keys j <= i."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def segment_mask(q_segments, k_segments):
  """[batch, q_len] and [batch, k_len] segment ids -> [batch, 1, q_len, k_len]: same packed example only.

  Segment 0 is padding: a key in segment 0 is never attended to (a padding query's row is all-masked,
  which the large-negative fill keeps finite).
  """
  same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
  return jnp.logical_and(same, (k_segments != 0)[:, None, None, :])


def positions_from_segments(segment_ids):
  """[batch, len] segment ids -> [batch, len] int32 positions restarting at 0 where the segment id changes."""
  idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


@jax.custom_vjp
def add_bias(logits, bias):
  """logits [batch, heads, q, k] + bias broadcast from [1 or batch, heads, q, k].

  The same as `+`. On XLA:CPU only, a bias shared by the batch gets its gradient summed over the batch as a
  matmul with a ones vector: plain autodiff's reduce over the leading axis, which XLA:CPU fuses across the
  layers that share the bias into one strided pass, was the backward's slowest op there (benchmarks/README.md,
  "Where the backward went"). The TPU compiler keeps the plain reduce: the matmul form cost it 19% more
  temporaries ("The CPU-tuned forms on the TPU compiler").
  """
  return logits + bias


def _add_bias_fwd(logits, bias):
  return logits + bias, bias.shape[0] == 1 and logits.shape[0] > 1


def _batch_sum_as_matmul(g):
  # The barrier hides the constant from XLA, which would otherwise simplify the matmul back into the reduce.
  ones = jax.lax.optimization_barrier(jnp.ones((g.shape[0],), g.dtype))
  return jnp.einsum("b...,b->...", g, ones)[None]


def _add_bias_bwd(shared, g):
  if not shared:
    return g, g
  # Chosen when the step is lowered for its platform (a TPU plan made on a CPU host gets the TPU branch).
  return g, jax.lax.platform_dependent(g, cpu=_batch_sum_as_matmul, default=lambda g: jnp.sum(g, 0, keepdims=True))


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def combine_masks(*masks):
  """Logical AND of the masks that are not None (None if all are)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def softmax_values(logits, value, dropout, deterministic, dtype):
  """softmax(logits) @ value with dropout on the weights: [b, h, q, k] x [b, h, k, d] -> [b, q, h, d].

  Normalized after the value product, so the division touches [b, q, h, d] rather than [b, h, q, k]
  (benchmarks/README.md, "Where the backward went"). Float32 all through: a bf16 softmax over long keys is too coarse.
  """
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalized = jnp.exp(shifted)  # float32, each row's largest entry exactly 1
  denominator = jnp.sum(unnormalized, axis=-1)  # [b, h, q]
  # Dropout scales entries of a row independently, so it commutes with dividing the row by its sum.
  unnormalized = dropout(unnormalized, deterministic=deterministic)
  out = jnp.einsum("bhqk,bhkd->bqhd", unnormalized.astype(dtype), value, preferred_element_type=jnp.float32)
  return (out / denominator.transpose(0, 2, 1)[..., None]).astype(dtype)


def dense_attention(query, key, value, mask, bias, dropout, deterministic, dtype):
  """The whole [batch, heads, q, k] score tensor at once: the reference, and the fast form for short inputs."""
  # Accumulated in float32 even when the inputs are bf16.
  logits = jnp.einsum("bqhd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = add_bias(logits, bias.astype(jnp.float32))
  if mask is not None:
    # A large finite negative rather than -inf keeps fully masked rows (padding queries) free of NaNs.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return softmax_values(logits, value, dropout, deterministic, dtype)


class MultiHeadAttention(nn.Module):
  """Attention with separate query/key/value/out kernels and no 1/sqrt(d_kv) on the logits.

  Kernels: query/key/value [embed, heads, kv], out [heads, kv, embed]. T5 folds the 1/sqrt(d_kv) into the
  query's init (std (d_model * d_kv)**-0.5, Mesh TF), so a converted checkpoint must not be rescaled.

  With `decode=True` self-attention keeps `cache/{cached_key, cached_value}` [batch, heads, max_len, kv] and
  `cache/cache_index` []. The first decode call (cache absent) only creates the cache, shaped by its
  [batch, max_len] input; each later call takes one query token, writes its key/value at `cache_index`,
  and attends to the slots filled so far.

  Cross-attention (`cross=True`) under `decode=True` keeps `cache/{cross_key, cross_value}`
  [batch, heads, enc_len, kv]: the first call projects them from `inputs_kv` (the encodings), later calls
  reuse them, so a decoding step costs no key/value projection of the encoder states.
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  cross: bool = False
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, deterministic=True, decode=False):
    """inputs_q [batch, q_len, embed], inputs_kv [batch, k_len, embed]; mask/bias broadcast to
    [batch, heads, q_len, k_len], or `mask` a blockwise.Pattern (and bias None), which computes the same
    attention tile by tile. Returns [batch, q_len, embed]."""
    d_model = inputs_q.shape[-1]
    dense = functools.partial(DenseGeneral, dtype=self.dtype, lora_dropout=self.lora_dropout)
    proj = lambda name, std: dense((self.num_heads, self.d_kv), ("embed", "heads", "kv"), std, name=name)
    query = proj("query", (d_model * self.d_kv) ** -0.5)(inputs_q)  # [batch, q_len, heads, kv]
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    # Keys and values are kept heads-major, [batch, heads, k_len, kv]: the layout both attention products
    # read, so the decoder's caches are stored in it and a decoding step transposes none of them.
    reuse_cross = decode and self.cross and self.has_variable("cache", "cross_key")
    if reuse_cross:
      key = self.get_variable("cache", "cross_key")
      value = self.get_variable("cache", "cross_value")
    else:
      heads_major = lambda x: nn.with_logical_constraint(x.transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv"))
      key = heads_major(proj("key", d_model**-0.5)(inputs_kv))
      value = heads_major(proj("value", d_model**-0.5)(inputs_kv))
      if decode and self.cross:  # the initialising call: keep the encoder-side projections for every step
        self.put_variable("cache", "cross_key", key)
        self.put_variable("cache", "cross_value", value)

    if decode and not self.cross:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        max_len = cached_key.value.shape[2]
        if query.shape[1] != 1:
          raise ValueError(f"cached decoding takes one token per call, got {query.shape[1]}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), (0, 0, index, 0))
        value = jax.lax.dynamic_update_slice(
          cached_value.value, value.astype(cached_value.value.dtype), (0, 0, index, 0)
        )
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        # Slots after the current position hold zeros (or stale keys): never attend to them.
        filled = (jnp.arange(max_len) <= index)[None, None, None, :]
        mask = combine_masks(mask, filled)

    if isinstance(mask, blockwise.Pattern):
      if self.dropout_rate and not deterministic:
        raise ValueError("attention_impl='blockwise' has no dropout on the attention weights: set dropout_rate=0")
      out = blockwise.attention(query, key, value, mask)
    else:
      out = dense_attention(query, key, value, mask, bias, nn.Dropout(self.dropout_rate), deterministic, self.dtype)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return dense(d_model, ("heads", "kv", "embed"), (self.num_heads * self.d_kv) ** -0.5, axis=(-2, -1), name="out")(
      out
    )

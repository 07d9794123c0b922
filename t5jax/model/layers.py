"""The building blocks of a T5 layer: RMS norm, embedding, bias-free dense, relative position bias, MLP.

Every parameter is float32 and carries logical axis names ('vocab', 'embed', 'mlp', 'heads', 'kv',
'relpos_buckets'); `parallel.py` maps them to mesh axes. Computation runs in the module's `dtype`.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _normal(stddev, axes):
  """A float32 normal initializer carrying logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32.

  [..., embed] -> [..., embed] in `dtype`.
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32
    )
    # float32 even under bf16: the mean of squares over thousands of features loses too much in bf16.
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


class Embed(nn.Module):
  """A token embedding table [vocab, embed]; `attend` reuses it as the tied output projection."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    # std 1.0 (Mesh TF): T5 scales the tied head's input by d_model**-0.5 instead of scaling the table.
    self.embedding = self.param(
      "embedding", _normal(1.0, ("vocab", "embed")), (self.num_embeddings, self.features), jnp.float32
    )

  def __call__(self, ids):
    """[batch, length] int -> [batch, length, embed]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """[batch, length, embed] -> [batch, length, vocab] float32: dot product with every embedding row."""
    # float32 accumulation: logits feed a softmax over tens of thousands of entries.
    return jnp.einsum(
      "ble,ve->blv", x.astype(self.dtype), self.embedding.astype(self.dtype), preferred_element_type=jnp.float32
    )


class DenseGeneral(nn.Module):
  """A bias-free dense layer contracting `axis` of the input with the kernel's leading axes.

  Kernel shape: [*input dims at `axis`, *features], e.g. query [embed, heads, kv], out [heads, kv, embed].
  """

  features: int | Sequence[int]
  kernel_axes: Sequence[str]
  init_std: float
  axis: int | Sequence[int] = -1
  dtype: Dtype = jnp.float32
  lora_dropout: float = 0.0  # on the input of LoRA adapters, when a train step passes them (lora_update)

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    kernel_shape = tuple(x.shape[a] for a in axis) + features
    kernel = self.param("kernel", _normal(self.init_std, tuple(self.kernel_axes)), kernel_shape, jnp.float32)
    contract = (axis, tuple(range(len(axis))))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    return lora_update(self, y, x, contract, self.lora_dropout)


def lora_update(module, y, x, contract, rate):
  """y + dropout(x) A B: the LoRA adapters (t5jax/lora.py) that `module` holds beside its kernel in the 'lora'
  collection, applied unmerged, A contracting x's axes `contract[0]`, B already scaled by alpha / r; y as it
  is when the module holds none (every call but a LoRA train step's).

  Unmerged, dropout can drop the adapters' input element by element (PEFT's lora_dropout; the kernel still
  sees x whole), and the backward needs no gradient of the kernel: x A is rank r, so the adapters cost
  O(rank) GEMMs per token, where merging W + AB costs a [in, out] weight gradient per step."""
  if not module.has_variable("lora", "a"):
    return y
  if rate > 0:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0)
  a, b = (module.get_variable("lora", name).astype(y.dtype) for name in ("a", "b"))
  xa = jax.lax.dot_general(x.astype(y.dtype), a, (contract, ((), ())))
  return y + jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))


def relative_position_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
  """Maps key_position - query_position to a bucket id (numpy; used as a compile-time constant).

  T5's scheme: with `bidirectional`, half the buckets are for keys after the query and half for keys before;
  otherwise keys after the query all fall in bucket 0. Within a half, distances below `n // 2` get a bucket
  each (n = buckets in the half), larger ones share log-spaced buckets up to `max_distance`, and everything
  farther lands in the last bucket.
  """
  relative_position = np.asarray(relative_position, dtype=np.int64)
  n = -relative_position  # how far back the key is
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  # max(n, 1) only keeps log() finite for the small distances that np.where discards.
  log_ratio = np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(n < max_exact, n, large)


def bucket_of_difference(rel, span, bidirectional, num_buckets=32, max_distance=128):
  """int32 buckets of a traced difference `rel` = key position - query position, each in (-span, span).

  The bucket depends only on the difference, so a numpy table over every difference, indexed by
  `rel + span - 1`, keeps the bucketing (logs and all) out of the traced program.
  """
  lookup = relative_position_bucket(np.arange(-span + 1, span), bidirectional, num_buckets, max_distance)
  return jnp.asarray(lookup, jnp.int32)[jnp.clip(rel + span - 1, 0, 2 * span - 2)]


class RelativePositionBias(nn.Module):
  """A learned scalar per (relative-position bucket, head), added to the attention logits.

  One table `rel_embedding: [relpos_buckets, heads]` per stack (HF's layout), shared by all its layers.
  """

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  init_std: float

  @nn.compact
  def __call__(self, q_len, k_len, query_offset=None, query_positions=None, key_positions=None, table_only=False):
    """Returns [1, heads, q_len, k_len] in float32 (it is added to float32 logits); with `table_only`, the
    table itself (blockwise attention looks it up tile by tile).

    Queries sit at positions `query_offset + arange(q_len)` (default offset 0) and keys at `arange(k_len)`.
    A traced `query_offset` serves cached decoding, where the query's position is the cache index.
    `query_positions` [batch, q_len] and `key_positions` [batch, k_len] (packed examples, whose positions
    restart at 0) replace those aranges; the result is then [batch, heads, q_len, k_len].
    """
    table = self.param(
      "rel_embedding",
      _normal(self.init_std, ("relpos_buckets", "heads")),
      (self.num_buckets, self.num_heads),
      jnp.float32,
    )
    if table_only:
      return table
    buckets_of = lambda rel, span: bucket_of_difference(
      rel, span, self.bidirectional, self.num_buckets, self.max_distance
    )
    if query_positions is not None:
      # Positions never reach the row length, so every difference lies in (-span, span).
      rel = key_positions[:, None, :] - query_positions[:, :, None]  # [batch, q, k]
      buckets = buckets_of(rel, max(q_len, k_len))
      return jnp.transpose(jnp.take(table, buckets, axis=0), (0, 3, 1, 2))
    if query_offset is None:
      # Shapes are static: the whole bucket matrix is a numpy constant folded into the program.
      rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
      buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
    else:
      # The offset lies in [0, k_len - q_len], so every difference lies in (-k_len, k_len).
      buckets = buckets_of(jnp.arange(k_len)[None, :] - (query_offset + jnp.arange(q_len))[:, None], k_len)
    values = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # [q, k, heads]
    return jnp.transpose(values, (2, 0, 1))[None]


ACTIVATIONS = {
  "relu": nn.relu,
  # T5.1.1's gelu is the tanh approximation (HF "gelu_new"), not the exact erf form.
  "gelu": lambda x: nn.gelu(x, approximate=True),
  "silu": nn.silu,
}


class Kernel(nn.Module):
  """A bare float32 kernel at `<name>/kernel`, for layers that join kernels before multiplying."""

  shape: Sequence[int]
  axes: Sequence[str]
  init_std: float

  @nn.compact
  def __call__(self):
    return self.param("kernel", _normal(self.init_std, tuple(self.axes)), tuple(self.shape), jnp.float32)


class MLP(nn.Module):
  """T5's feed-forward block. relu: wo(dropout(relu(wi x))); gated-*: wo(dropout(act(wi_0 x) * wi_1 x)).

  [batch, length, embed] -> [batch, length, embed].
  """

  d_ff: int
  feed_forward_proj: str
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    d_model = x.shape[-1]
    dense = functools.partial(DenseGeneral, dtype=self.dtype, lora_dropout=self.lora_dropout)
    gated = self.feed_forward_proj.startswith("gated-")
    act = ACTIVATIONS[self.feed_forward_proj.removeprefix("gated-")]
    if gated:
      # One GEMM for both input projections (their kernels joined per step, [embed, 2 * mlp]), so the
      # backward computes d(x) in one GEMM too instead of two and a sum: 8% off the T5.1.1-small train step.
      k0, k1 = (Kernel((d_model, self.d_ff), ("embed", "mlp"), d_model**-0.5, name=f"wi_{i}") for i in (0, 1))
      both = jnp.einsum("...e,ef->...f", x.astype(self.dtype), jnp.concatenate([k0(), k1()], 1).astype(self.dtype))
      contract = ((x.ndim - 1,), (0,))
      h0, h1 = (
        lora_update(k, y, x, contract, self.lora_dropout)
        for k, y in ((k0, both[..., : self.d_ff]), (k1, both[..., self.d_ff :]))
      )
      h = act(h0) * h1
    else:
      h = act(dense(self.d_ff, ("embed", "mlp"), d_model**-0.5, name="wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(d_model, ("mlp", "embed"), self.d_ff**-0.5, name="wo")(h)

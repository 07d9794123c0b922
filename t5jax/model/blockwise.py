"""Blockwise T5 attention: one (query block, key block) tile of scores at a time, never an [L, L] tensor.

The algorithm of Rabe & Staats 2021 and FlashAttention-2 (Dao 2023): an online softmax in float32 (a running
max and sum per query) over key blocks, and a custom VJP that saves only the output and each query's max and
sum, and recomputes each tile. What is T5's own: the relative position bias is a function of the bucket of (k - q)
alone, so each tile looks it up from the [buckets, heads] table, and the backward pass adds the tile's score
gradients into that table by bucket, which makes the table's gradient exact.

It computes what attention.py's dense path computes, masked entries included: a masked score is the float32
minimum there (not -inf), so a query that may attend to nothing (padding) averages every key, as dense does.
Layouts as MultiHeadAttention's: query [batch, q_len, heads, kv], key and value [batch, heads, k_len, kv].
"""

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t5jax.model.layers import relative_position_bucket

MASKED = float(jnp.finfo(jnp.float32).min)  # a masked score, as the dense path fills it


class Pattern(flax.struct.PyTreeNode):
  """What the tiles make their bias and mask from, in place of the dense path's [.., q, k] bias and mask."""

  table: Any  # [buckets, heads] float32 relative position bias; None = no bias (cross-attention)
  q_pos: Any  # [batch, q_len] int32: the positions the bias reads (restarting per packed example)
  k_pos: Any  # [batch, k_len] int32
  k_valid: Any  # [batch, k_len] bool, False = a padding key; None = every key is real
  q_seg: Any  # [batch, q_len] int32 packed segment ids (0 = padding), or None (not packed)
  k_seg: Any  # [batch, k_len] int32, or None
  causal: bool = flax.struct.field(pytree_node=False)  # query i may attend to keys j <= i only
  bidirectional: bool = flax.struct.field(pytree_node=False)  # the bucket scheme (encoder True, decoder False)
  num_buckets: int = flax.struct.field(pytree_node=False, default=32)
  max_distance: int = flax.struct.field(pytree_node=False, default=128)
  block_q: int = flax.struct.field(pytree_node=False, default=512)
  block_k: int = flax.struct.field(pytree_node=False, default=512)


def self_pattern(config, table, shape, mask, segment_ids, positions, causal):
  """A stack's self-attention Pattern: the encoder's (bidirectional buckets) or the decoder's (causal).
  `shape` (batch, length); `mask` [batch, length] nonzero = real token, or None; packed rows' `segment_ids` and
  `positions` as the stacks take them."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  return Pattern(
    table,
    positions,
    positions,
    None if mask is None else mask != 0,
    segment_ids,
    segment_ids,
    causal=causal,
    bidirectional=not causal,
    num_buckets=config.relative_attention_num_buckets,
    max_distance=config.relative_attention_max_distance,
    block_q=config.attention_block_q,
    block_k=config.attention_block_k,
  )


def cross_pattern(config, encoder_mask, segment_ids, encoder_segment_ids):
  """Cross-attention's Pattern: no bias, the encoder's padding and (packed) segments."""
  return Pattern(
    None,
    None,
    None,
    None if encoder_mask is None else encoder_mask != 0,
    segment_ids,
    encoder_segment_ids,
    causal=False,
    bidirectional=True,
    block_q=config.attention_block_q,
    block_k=config.attention_block_k,
  )


class _Static(NamedTuple):
  causal: bool
  bidirectional: bool
  num_buckets: int
  max_distance: int
  block_q: int
  block_k: int
  q_len: int
  k_len: int


def attention(query, key, value, pattern):
  """softmax(q k^T + bias, masked) v for the dense path's layouts -> [batch, q_len, heads, kv] in query's dtype."""
  q_len, k_len = query.shape[1], key.shape[2]
  static = _Static(
    pattern.causal,
    pattern.bidirectional,
    pattern.num_buckets,
    pattern.max_distance,
    min(pattern.block_q, q_len),
    min(pattern.block_k, k_len),
    q_len,
    k_len,
  )
  b = query.shape[0]
  k_valid = jnp.ones((b, k_len), jnp.bool_) if pattern.k_valid is None else pattern.k_valid.astype(jnp.bool_)
  segments = (pattern.q_seg, pattern.k_seg) if pattern.q_seg is not None else (None, None)
  parts = (pattern.q_pos, pattern.k_pos, k_valid, *segments)
  return _attention(static, query, key, value, pattern.table, *parts)


def _blocks(x, axis, size):
  """x padded with zeros along `axis` to a multiple of `size`, that axis split into [n, size] (n first)."""
  n = -(-x.shape[axis] // size)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * size - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


def _bucket_lookup(s):
  """int32 buckets of every difference k - q in (-span, span), indexed by difference + span - 1."""
  span = max(s.q_len, s.k_len)
  return jnp.asarray(
    relative_position_bucket(np.arange(-span + 1, span), s.bidirectional, s.num_buckets, s.max_distance), jnp.int32
  ), span


def _tile(s, q, k, table, q_pos, k_pos, k_valid, q_seg, k_seg, i, j):
  """Scores [b, h, bq, bk] of query block i against key block j (float32, masked as dense), the mask of the
  real and allowed entries, and the tile's buckets [b, bq, bk] (None without a bias)."""
  scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  buckets = None
  if table is not None:
    lookup, span = _bucket_lookup(s)
    rel = k_pos[:, None, :] - q_pos[:, :, None]
    buckets = lookup[jnp.clip(rel + span - 1, 0, lookup.shape[0] - 1)]
    scores = scores + jnp.moveaxis(jnp.take(table, buckets, axis=0), -1, 1)
  q_idx = i * s.block_q + jnp.arange(s.block_q)
  k_idx = j * s.block_k + jnp.arange(s.block_k)
  allowed = k_valid[:, None, None, :]
  if q_seg is not None:
    allowed = allowed & (q_seg[:, None, :, None] == k_seg[:, None, None, :]) & (k_seg != 0)[:, None, None, :]
  if s.causal:
    allowed = allowed & (q_idx[:, None] >= k_idx[None, :])[None, None]
  scores = jnp.where(allowed, scores, MASKED)
  # Keys past k_len (padding up to a block) are not keys at all: -inf leaves them out of every softmax.
  scores = jnp.where((k_idx < s.k_len)[None, None, None, :], scores, -jnp.inf)
  return scores, allowed, buckets


def _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg):
  """The tiles' inputs split into blocks (block index first)."""
  qb = _blocks(query, 1, s.block_q)  # [nq, b, bq, h, d]
  kb, vb = _blocks(key, 2, s.block_k), _blocks(value, 2, s.block_k)  # [nk, b, h, bk, d]
  q_side = [_blocks(x, 1, s.block_q) if x is not None else None for x in (q_pos, q_seg)]
  k_side = [_blocks(x, 1, s.block_k) if x is not None else None for x in (k_pos, k_valid, k_seg)]
  return qb, kb, vb, q_side, k_side


def _at(x, i):
  return None if x is None else x[i]


def _forward(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg):
  qb, kb, vb, (qp, qs), (kp, kv, ks) = _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg)
  b, h, d = query.shape[0], query.shape[2], query.shape[3]

  def query_block(i):
    def key_block(carry, j):
      m, l, acc = carry
      scores, _, _ = _tile(s, qb[i], kb[j], table, _at(qp, i), _at(kp, j), kv[j], _at(qs, i), _at(ks, j), i, j)
      m_new = jnp.maximum(m, scores.max(axis=-1))
      p = jnp.exp(scores - m_new[..., None])
      correction = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(value.dtype), vb[j], preferred_element_type=jnp.float32)
      return (m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv), None

    start = (
      jnp.full((b, h, s.block_q), MASKED, jnp.float32),
      jnp.zeros((b, h, s.block_q), jnp.float32),
      jnp.zeros((b, h, s.block_q, d), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(key_block, start, jnp.arange(kb.shape[0]))
    return acc / l[..., None], m, l

  out, m, l = jax.lax.map(query_block, jnp.arange(qb.shape[0]))  # [nq, b, h, bq, d], [nq, b, h, bq] x 2
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, -1, d)[:, :, : s.q_len]
  return out.transpose(0, 2, 1, 3).astype(query.dtype), (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg):
  return _forward(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg)[0]


def _attention_fwd(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg):
  out, (m, l) = _forward(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg)
  return out, (query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg, out, m, l)


def _attention_bwd(s, residuals, d_out):
  query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg, out, m, l = residuals
  qb, kb, vb, (qp, qs), (kp, kv, ks) = _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg)
  dob = _blocks(d_out, 1, s.block_q)  # [nq, b, bq, h, d]
  # delta_i = sum_j p_ij dp_ij = d_out_i . out_i: the softmax's backward needs it per query.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta_b = _blocks(delta, 2, s.block_q)  # [nq, b, h, bq], like the forward's running max m and sum l
  f32 = jnp.float32

  def query_block(carry, i):
    dk, dv, d_table = carry

    def key_block(inner, j):
      dq, dk, dv, d_table = inner
      scores, allowed, buckets = _tile(
        s, qb[i], kb[j], table, _at(qp, i), _at(kp, j), kv[j], _at(qs, i), _at(ks, j), i, j
      )
      # The forward's probabilities, recomputed from its max and sum (not their log-sum-exp: with every score
      # masked, the minimum float plus log(sum) rounds back to the minimum, and a padding row would be off).
      p = jnp.exp(scores - m[i][..., None]) / l[i][..., None]
      dv = dv.at[j].add(jnp.einsum("bhqk,bqhd->bhkd", p, dob[i], preferred_element_type=f32))
      dp = jnp.einsum("bqhd,bhkd->bhqk", dob[i], vb[j], preferred_element_type=f32)
      # A masked score is a constant (jnp.where's gradient): nothing flows back through it.
      ds = jnp.where(allowed, p * (dp - delta_b[i][..., None]), 0.0)
      dq = dq + jnp.einsum("bhqk,bhkd->bqhd", ds, kb[j], preferred_element_type=f32)
      dk = dk.at[j].add(jnp.einsum("bhqk,bqhd->bhkd", ds, qb[i], preferred_element_type=f32))
      if buckets is not None:  # the bias table's gradient: the tile's score gradients summed by bucket
        one_hot = jax.nn.one_hot(buckets, s.num_buckets, dtype=f32)  # [b, bq, bk, buckets]
        d_table = d_table + jnp.einsum("bhqk,bqkn->nh", ds, one_hot)
      return (dq, dk, dv, d_table), None

    dq = jnp.zeros(qb.shape[1:], f32)
    (dq, dk, dv, d_table), _ = jax.lax.scan(key_block, (dq, dk, dv, d_table), jnp.arange(kb.shape[0]))
    return (dk, dv, d_table), dq

  start = (jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32), jnp.zeros_like(table) if table is not None else None)
  (dk, dv, d_table), dq = jax.lax.scan(query_block, start, jnp.arange(qb.shape[0]))
  b, h, d = query.shape[0], query.shape[2], query.shape[3]
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, -1, h, d)[:, : s.q_len]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, h, -1, d)[:, :, : s.k_len]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, h, -1, d)[:, :, : s.k_len]
  grads = (dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), d_table)
  return grads + (None,) * 5


_attention.defvjp(_attention_fwd, _attention_bwd)

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

from t5jax.model.layers import bucket_of_difference

MASKED = float(jnp.finfo(jnp.float32).min)  # a masked score, as the dense path fills it


class Pattern(flax.struct.PyTreeNode):
  """What the tiles make their bias and mask from, in place of the dense path's [.., q, k] bias and mask."""

  table: Any  # [buckets, heads] float32 relative position bias; None = no bias (cross-attention)
  # [batch, q_len] int32 positions the bias reads, or None: the index in the row. None serves packed rows too,
  # when positions restart at each example: only queries and keys of one example meet, and their difference
  # of positions is their difference of indices. Then each tile's bias is Toeplitz, made from one diagonal.
  q_pos: Any
  k_pos: Any  # [batch, k_len] int32, or None
  k_valid: Any  # [batch, k_len] bool, False = a padding key; None = every key is real
  q_seg: Any  # [batch, q_len] int32 packed segment ids (0 = padding), or None (not packed)
  k_seg: Any  # [batch, k_len] int32, or None
  causal: bool = flax.struct.field(pytree_node=False)  # query i may attend to keys j <= i only
  bidirectional: bool = flax.struct.field(pytree_node=False)  # the bucket scheme (encoder True, decoder False)
  num_buckets: int = flax.struct.field(pytree_node=False, default=32)
  max_distance: int = flax.struct.field(pytree_node=False, default=128)
  block_q: int = flax.struct.field(pytree_node=False, default=512)
  block_k: int = flax.struct.field(pytree_node=False, default=512)


def self_pattern(config, table, mask, segment_ids, positions, causal):
  """A stack's self-attention Pattern: the encoder's (bidirectional buckets) or the decoder's (causal).
  `mask` [batch, length] nonzero = real token, or None; packed rows' `segment_ids`; `positions` as given to the
  stack, None unless given (see Pattern.q_pos)."""
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


def _toeplitz(diagonal, bq, bk):
  """[..., bq + bk - 1] -> [..., bq, bk] whose (r, c) entry is diagonal[c - r + bq - 1], by reshapes alone.

  Copies of the diagonal laid end to end and read back in rows one shorter shift each row by one."""
  lead = diagonal.shape[:-1]
  padded = jnp.pad(diagonal, [(0, 0)] * len(lead) + [(0, 1)])  # rows of bq + bk: every row reaches bk entries
  flat = jnp.broadcast_to(padded[..., None, :], (*lead, bq, bq + bk)).reshape(*lead, -1)
  return flat[..., bq - 1 : bq - 1 + bq * (bq + bk - 1)].reshape(*lead, bq, bq + bk - 1)[..., :bk]


def _diagonal_sums(x, bq, bk):
  """[..., bq, bk] -> [..., bq + bk - 1]: the sum of each diagonal c - r + bq - 1, `_toeplitz`'s transpose."""
  lead = x.shape[:-2]
  rows = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, bq - 1)]).reshape(*lead, -1)  # rows of bq + bk - 1
  flat = jnp.pad(rows, [(0, 0)] * len(lead) + [(bq - 1, 1)])
  return flat.reshape(*lead, bq, bq + bk).sum(-2)[..., : bq + bk - 1]


def _tile(s, q, k, table, q_pos, k_pos, k_valid, q_seg, k_seg, i, j):
  """Scores [b, h, bq, bk] of query block i against key block j (float32, masked as dense), the mask of the
  real and allowed entries, and the tile's buckets: [bq + bk - 1] by diagonal c - r (no positions given),
  [b, bq, bk] (positions), None (no bias)."""
  scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  buckets = None
  if table is not None:
    of = lambda rel: bucket_of_difference(rel, max(s.q_len, s.k_len), s.bidirectional, s.num_buckets, s.max_distance)  # noqa: E731
    if q_pos is None:  # k - q = j bk - i bq + (c - r): one bucket per diagonal, looked up once
      buckets = of(j * s.block_k - i * s.block_q + jnp.arange(-s.block_q + 1, s.block_k))
      scores = scores + _toeplitz(jnp.take(table, buckets, axis=0).T, s.block_q, s.block_k)[None]
    else:
      buckets = of(k_pos[:, None, :] - q_pos[:, :, None])
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


def _tied(query, *parts):
  """`parts` (the bias table, positions, masks) passed through one optimization barrier with the query.

  JAX's partial evaluation (jax.checkpoint's recomputation, a scan over layers) treats what depends only on
  inputs that are not differentiated, or that the layer loop does not change, as known: the tiles' bias and mask
  then become residuals stacked over every tile, a dense [L, L] tensor again (1.5 GiB at 8k, kept from the
  forward to the backward pass). Tied to the query they depend on what the layer computes, and stay in the tile.
  """
  return jax.lax.optimization_barrier((query, parts))


def _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg):
  """The tiles' inputs split into blocks (block index first)."""
  qb = _blocks(query, 1, s.block_q)  # [nq, b, bq, h, d]
  kb, vb = _blocks(key, 2, s.block_k), _blocks(value, 2, s.block_k)  # [nk, b, h, bk, d]
  q_side = [_blocks(x, 1, s.block_q) if x is not None else None for x in (q_pos, q_seg)]
  k_side = [_blocks(x, 1, s.block_k) if x is not None else None for x in (k_pos, k_valid, k_seg)]
  return qb, kb, vb, q_side, k_side


def _at(x, i):
  return None if x is None else x[i]


def _live_tiles(s, k_valid, q_seg, k_seg):
  """[nq, nk] bool: the tiles where some query of the batch may attend to some key. The others are skipped.

  Blocked inputs as `_inputs` makes them. A tile is dead when causality leaves it empty (every key after every
  query), when its key block holds no real key in any row, or when no row's query and key blocks share a packed
  example. Each block's range of nonzero segment ids decides the last: blocks whose ranges do not meet share no
  id. The test is on whole blocks, so it may keep a dead tile alive, never the reverse.
  """
  nq, nk = -(-s.q_len // s.block_q), -(-s.k_len // s.block_k)
  live = jnp.any(k_valid, axis=-1)[None]  # [1, nk, b]
  if q_seg is not None:
    big = jnp.iinfo(jnp.int32).max
    low = lambda seg: jnp.where(seg != 0, seg, big).min(-1)  # noqa: E731
    meet = (low(q_seg)[:, None] <= k_seg.max(-1)[None]) & (low(k_seg)[None] <= q_seg.max(-1)[:, None])
    live = live & meet  # [nq, nk, b]
  live = jnp.broadcast_to(live.any(-1), (nq, nk))
  if s.causal:  # the first key of block j comes after the last query of block i
    first_key, last_query = np.arange(nk) * s.block_k, np.arange(nq) * s.block_q + s.block_q - 1
    live = live & (first_key[None, :] <= last_query[:, None])
  return live


def _key_sums(s, vb):
  """Each key block's sum of values [nk, b, h, d] (float32) and count of keys within k_len [nk].

  What a skipped tile still gives a query that may attend to nothing: dense softmaxes its all-masked row into
  the mean of every key, so such a query takes every key block's values, live or not.
  """
  counts = np.minimum(s.block_k, s.k_len - np.arange(vb.shape[0]) * s.block_k).astype(np.float32)
  return vb.astype(jnp.float32).sum(axis=3), jnp.asarray(counts)  # block padding is zeros: no part of the sum


def _forward(s, query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg):
  query, (table, q_pos, k_pos, k_valid, q_seg, k_seg) = _tied(query, table, q_pos, k_pos, k_valid, q_seg, k_seg)
  qb, kb, vb, (qp, qs), (kp, kv, ks) = _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg)
  b, h, d = query.shape[0], query.shape[2], query.shape[3]
  live = _live_tiles(s, kv, qs, ks)
  v_sum, k_count = _key_sums(s, vb)

  def query_block(i):
    def tile(carry, j):
      m, l, acc = carry
      scores, _, _ = _tile(s, qb[i], kb[j], table, _at(qp, i), _at(kp, j), kv[j], _at(qs, i), _at(ks, j), i, j)
      m_new = jnp.maximum(m, scores.max(axis=-1))
      p = jnp.exp(scores - m_new[..., None])
      correction = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(value.dtype), vb[j], preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    def skipped(carry, j):
      # Every score of the tile is masked: it adds exp(MASKED - m) = 0 to a query with a real score so far, and
      # 1 per key to a query without one (m still MASKED), as the dense softmax of an all-masked row does.
      m, l, acc = carry
      none_yet = m == MASKED
      return (
        m,
        l + jnp.where(none_yet, k_count[j], 0.0),
        acc + jnp.where(none_yet[..., None], v_sum[j][:, :, None], 0.0),
      )

    def key_block(carry, j):
      return jax.lax.cond(live[i, j], tile, skipped, carry, j), None

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


def _table_gradient(s, ds, buckets):
  """[b, buckets, heads]: each row's tile score gradients [b, h, bq, bk] summed by bucket, as `_tile` gave them.

  Per row, summed over the batch once after the loops: the batch is sharded over devices, and a sum over it
  in every tile would be an all-reduce of the tile in every tile (38 GiB a step for T5.1.1-base at 8k)."""
  one_hot = jax.nn.one_hot(buckets, s.num_buckets, dtype=jnp.float32)
  if buckets.ndim == 1:  # Toeplitz: one bucket per diagonal, so sum each diagonal first
    return jnp.einsum("bhd,dn->bnh", _diagonal_sums(ds, s.block_q, s.block_k), one_hot)
  return jnp.einsum("bhqk,bqkn->bnh", ds, one_hot)  # [b, bq, bk, buckets]


def _attention_bwd(s, residuals, d_out):
  query, key, value, table, q_pos, k_pos, k_valid, q_seg, k_seg, out, m, l = residuals
  query, (table, q_pos, k_pos, k_valid, q_seg, k_seg) = _tied(query, table, q_pos, k_pos, k_valid, q_seg, k_seg)
  qb, kb, vb, (qp, qs), (kp, kv, ks) = _inputs(s, query, key, value, q_pos, k_pos, k_valid, q_seg, k_seg)
  dob = _blocks(d_out, 1, s.block_q)  # [nq, b, bq, h, d]
  # delta_i = sum_j p_ij dp_ij = d_out_i . out_i: the softmax's backward needs it per query.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta_b = _blocks(delta, 2, s.block_q)  # [nq, b, h, bq], like the forward's running max m and sum l
  f32 = jnp.float32
  live = _live_tiles(s, kv, qs, ks)

  def query_block(carry, i):
    dk, dv, d_table = carry

    def tile(inner, j):
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
      return dq, dk, dv, d_table if buckets is None else d_table + _table_gradient(s, ds, buckets)

    def skipped(inner, j):
      # Only a query with no real score anywhere (m still MASKED) weighs these keys, each by 1 / l; its scores
      # are constants, so of the tile's gradients only the values' is not zero. (Keys past k_len get a share
      # too and are cut off below.)
      dq, dk, dv, d_table = inner
      weight = jnp.where(m[i] == MASKED, 1.0 / l[i], 0.0)  # [b, h, bq]
      per_key = jnp.einsum("bhq,bqhd->bhd", weight, dob[i], preferred_element_type=f32)
      return dq, dk, dv.at[j].add(per_key[:, :, None]), d_table

    def key_block(inner, j):
      return jax.lax.cond(live[i, j], tile, skipped, inner, j), None

    dq = jnp.zeros(qb.shape[1:], f32)
    (dq, dk, dv, d_table), _ = jax.lax.scan(key_block, (dq, dk, dv, d_table), jnp.arange(kb.shape[0]))
    return (dk, dv, d_table), dq

  b, h, d = query.shape[0], query.shape[2], query.shape[3]
  d_table = None if table is None else jnp.zeros((b, *table.shape), f32)
  (dk, dv, d_table), dq = jax.lax.scan(
    query_block, (jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32), d_table), jnp.arange(qb.shape[0])
  )
  d_table = None if table is None else d_table.sum(0)
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, -1, h, d)[:, : s.q_len]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, h, -1, d)[:, :, : s.k_len]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, h, -1, d)[:, :, : s.k_len]
  grads = (dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), d_table)
  return grads + (None,) * 5


_attention.defvjp(_attention_fwd, _attention_bwd)

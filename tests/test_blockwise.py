"""Blockwise attention (t5jax/model/blockwise.py) against the dense path: outputs and the gradients of query,
key, value and the bias table, with lengths that are not multiples of the blocks, padding, packed segments,
causal masks and an all-padding row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5jax.model import attention, blockwise
from t5jax.model.layers import relative_position_bucket

B, H, D, BUCKETS = 3, 2, 8, 32


def dense(query, key, value, p):
  """MultiHeadAttention's dense computation of the same pattern: the [b, h, q, k] bias and mask, then softmax."""
  logits = jnp.einsum("bqhd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
  q_len, k_len = query.shape[1], key.shape[2]
  if p.table is not None:
    span = max(q_len, k_len)
    lookup = jnp.asarray(relative_position_bucket(np.arange(-span + 1, span), p.bidirectional, BUCKETS, 128))
    q_pos, k_pos = p.q_pos, p.k_pos
    if q_pos is None:  # the index in the row, restarting at each packed example
      q_pos = k_pos = (
        attention.positions_from_segments(p.q_seg) if p.q_seg is not None else jnp.arange(q_len)[None].repeat(B, 0)
      )
    buckets = lookup[k_pos[:, None, :] - q_pos[:, :, None] + span - 1]
    logits = logits + jnp.moveaxis(p.table[buckets], -1, 1)
  mask = attention.combine_masks(
    None if p.k_valid is None else attention.padding_mask(p.k_valid),
    None if p.q_seg is None else attention.segment_mask(p.q_seg, p.k_seg),
    attention.causal_mask(q_len) if p.causal else None,
  )
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return attention.softmax_values(logits, value, lambda x, deterministic: x, True, query.dtype)


def _case(
  q_len, k_len, causal=False, bias=True, packed=False, padded=False, aligned=False, short=False, positions=False
):
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(B, q_len, H, D)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(B, H, k_len, D)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(B, H, k_len, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(BUCKETS, H)), jnp.float32) if bias else None
  q_pos = np.broadcast_to(np.arange(q_len, dtype=np.int32), (B, q_len)).copy()
  k_pos = np.broadcast_to(np.arange(k_len, dtype=np.int32), (B, k_len)).copy()
  q_seg = k_seg = k_valid = None
  if packed:  # rows of 2-3 examples, the tail padding (segment 0); row 2 is all padding
    cuts = [(q_len // 3, 2 * q_len // 3), (q_len // 2, q_len - 2), (0, 0)]
    if aligned:  # rows 0 and 1 packed alike, at multiples of 16: tiles across two examples are skipped
      cuts = [(16, 32), (16, 32), (0, 0)]
    q_seg = np.zeros((B, q_len), np.int32)
    for r, (a, b) in enumerate(cuts):
      if r < 2:
        q_seg[r, :a], q_seg[r, a:b], q_seg[r, b : q_len - 1] = 1, 2, 3
    k_seg = q_seg
    q_pos = np.asarray(attention.positions_from_segments(jnp.asarray(q_seg)))
    k_pos = q_pos
  if padded:  # key padding: row 0 full, row 1 half, row 2 none real
    k_valid = np.zeros((B, k_len), bool)
    k_valid[0], k_valid[1, : k_len // 2] = True, True
    if short:  # no row has a real key from 14 on: the key blocks after the first are skipped
      k_valid[:, 14:] = False
  # Positions given (the bias by gathers) or not (the Toeplitz tiles); None is the index, restarting per example.
  pattern = blockwise.Pattern(
    table,
    jnp.asarray(q_pos) if positions else None,
    jnp.asarray(k_pos) if positions else None,
    None if k_valid is None else jnp.asarray(k_valid),
    None if q_seg is None else jnp.asarray(q_seg),
    None if k_seg is None else jnp.asarray(k_seg),
    causal=causal,
    bidirectional=not causal,
  )
  return query, key, value, pattern


CASES = {
  "encoder": dict(q_len=37, k_len=37),
  "encoder padded": dict(q_len=37, k_len=37, padded=True),
  "encoder packed": dict(q_len=41, k_len=41, packed=True),
  "encoder packed, positions given": dict(q_len=41, k_len=41, packed=True, positions=True),
  "encoder packed at blocks": dict(q_len=48, k_len=48, packed=True, aligned=True),
  "encoder short": dict(q_len=37, k_len=37, padded=True, short=True),
  "decoder causal": dict(q_len=29, k_len=29, causal=True),
  "decoder packed": dict(q_len=33, k_len=33, causal=True, packed=True),
  "decoder, positions given": dict(q_len=29, k_len=29, causal=True, positions=True),
  "cross": dict(q_len=19, k_len=45, bias=False, padded=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blockwise_equals_dense_in_outputs_and_every_gradient(name):
  query, key, value, pattern = _case(**CASES[name])
  cotangent = jnp.asarray(np.random.default_rng(9).normal(size=query.shape), jnp.float32)

  def loss(fn, q, k, v, table):
    return jnp.sum(fn(q, k, v, pattern.replace(table=table)) * cotangent)

  block = lambda q, k, v, p: blockwise.attention(q, k, v, p.replace(block_q=8, block_k=16))  # noqa: E731
  want = dense(query, key, value, pattern)
  got = block(query, key, value, pattern)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  argnums = (1, 2, 3, 4) if pattern.table is not None else (1, 2, 3)
  g_dense = jax.grad(loss, argnums)(dense, query, key, value, pattern.table)
  g_block = jax.grad(loss, argnums)(block, query, key, value, pattern.table)
  for name_, a, b in zip(("query", "key", "value", "table"), g_block, g_dense, strict=False):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name_)


@pytest.mark.parametrize("bq, bk", [(1, 5), (3, 5), (5, 3), (4, 4)])
def test_toeplitz_tiles_and_their_diagonal_sums(bq, bk):
  diagonal = jnp.arange(bq + bk - 1, dtype=jnp.float32)[None] + jnp.asarray([[0.0], [100.0]])  # two leading rows
  tile = blockwise._toeplitz(diagonal, bq, bk)
  r, c = np.meshgrid(np.arange(bq), np.arange(bk), indexing="ij")
  np.testing.assert_array_equal(tile, np.asarray(diagonal)[:, c - r + bq - 1])
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, bq, bk)), jnp.float32)
  want = np.zeros((2, bq + bk - 1), np.float32)
  np.add.at(want, (slice(None), c - r + bq - 1), np.asarray(x))
  np.testing.assert_allclose(blockwise._diagonal_sums(x, bq, bk), want, rtol=1e-6)


# Tiles left out (blocks 8 x 16), by case: the parity test above runs each of these with that many skipped.
SKIPPED = {
  "decoder causal": 2,  # key block 1 (16..28) after query blocks 0 and 1 (0..15)
  "encoder short": 10,  # key blocks 1 and 2, for each of 5 query blocks
  "encoder packed at blocks": 12,  # 18 tiles, 6 within one example
  "encoder": 0,
  # Rows packed at other places: tiles (0, 2), (1, 2) and (4, 0) meet in no row, and query block 5 is padding.
  "encoder packed": 6,
}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_tiles_that_every_row_masks_are_skipped(name):
  query, key, value, p = _case(**CASES[name])
  k_valid = jnp.ones(key.shape[::2], bool) if p.k_valid is None else p.k_valid
  static = blockwise._Static(p.causal, p.bidirectional, BUCKETS, 128, 8, 16, query.shape[1], key.shape[2])
  qs, kv, ks = (
    None if x is None else blockwise._blocks(x, 1, n) for x, n in ((p.q_seg, 8), (k_valid, 16), (p.k_seg, 16))
  )
  live = np.asarray(blockwise._live_tiles(static, kv, qs, ks))
  assert live.size - live.sum() == SKIPPED[name]


# ---------------------------------------------------------------------------------------------------------
# The model: T5Config.attention_impl='blockwise' against 'dense', in every stack and the variants.

TINY = dict(
  vocab_size=96,
  d_model=16,
  num_heads=2,
  d_kv=8,
  d_ff=32,
  num_encoder_layers=2,
  num_decoder_layers=2,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
  attention_block_q=8,
  attention_block_k=16,
)
VARIANTS = {
  "padded": {},
  "packed": {},
  "scan + remat": dict(scan_layers=True, remat_policy="full"),
  "moe": dict(moe=dict(num_experts=2, every_encoder=1, every_decoder=1, capacity_factor_eval=2.0)),
  "bf16": dict(dtype="bfloat16"),
}


def _model_inputs(packed):
  rng = np.random.default_rng(3)
  enc, dec = rng.integers(2, 96, (B, 37)).astype(np.int32), rng.integers(2, 96, (B, 21)).astype(np.int32)
  kwargs = {}
  if packed:
    seg_e, seg_d = np.zeros((B, 37), np.int32), np.zeros((B, 21), np.int32)
    seg_e[0, :20], seg_e[0, 20:35], seg_d[0, :9], seg_d[0, 9:20] = 1, 2, 1, 2
    seg_e[1, :30], seg_d[1, :15] = 1, 1  # row 2 all padding
    enc, dec = np.where(seg_e > 0, enc, 0), np.where(seg_d > 0, dec, 0)
    kwargs = dict(encoder_segment_ids=jnp.asarray(seg_e), decoder_segment_ids=jnp.asarray(seg_d))
  else:
    enc[1, 25:], enc[2, 3:], dec[1, 12:] = 0, 0, 0  # padding: row 2 almost all of it
    kwargs = dict(decoder_attention_mask=jnp.asarray(dec != 0))
  return jnp.asarray(enc), jnp.asarray(dec), kwargs


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_model_with_blockwise_attention_equals_dense(name):
  from t5jax.model import T5, T5Config, init_params

  dense_config = T5Config.from_dict(dict(TINY, **VARIANTS[name])).validate()
  block_config = T5Config.from_dict(dict(TINY, **VARIANTS[name], attention_impl="blockwise")).validate()
  params = init_params(dense_config, jax.random.PRNGKey(0))
  enc, dec, kwargs = _model_inputs(packed=name == "packed")
  cotangent = jnp.asarray(np.random.default_rng(4).normal(size=(B, 21, 96)), jnp.float32)

  # Jitted: run op by op, the blockwise loops dispatch thousands of small ops, several times slower.
  @functools.partial(jax.jit, static_argnums=0)
  def forward(config, p):
    return T5(config).apply({"params": p}, enc, dec, **kwargs)

  def loss(config, p):
    return jnp.sum(forward(config, p) * cotangent)

  tol = 2e-2 if name == "bf16" else 1e-5  # bf16: relative to the largest entry (sums in another order)
  want, got = (forward(c, params) for c in (dense_config, block_config))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))
  g_dense, g_block = (
    jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(c, params) for c in (dense_config, block_config)
  )
  flat_dense = jax.tree_util.tree_flatten_with_path(g_dense)[0]
  for (path, a), b in zip(flat_dense, jax.tree.leaves(g_block), strict=True):
    scale = float(jnp.max(jnp.abs(a))) or 1.0
    # bf16 rounds the scores and the probabilities tile by tile: a few percent of the largest gradient entry.
    np.testing.assert_allclose(
      b / scale, a / scale, atol=tol * (3 if name == "bf16" else 1), err_msg=jax.tree_util.keystr(path)
    )


def test_train_run_at_1024_input_tokens_logs_the_dense_losses(corpus_file, tmp_path):
  """Three steps of span corruption at inputs of 1,024 tokens through `train.run`, dense then blockwise."""
  from conftest import tiny_config
  from t5jax import train
  from t5jax.metrics import read_metrics

  rows = {}
  for impl in ("dense", "blockwise"):
    config = tiny_config(
      corpus_file,
      "--config.data.inputs_length=1024",
      "--config.batch_size=2",
      "--config.total_steps=3",
      "--config.log_every=1",
      "--config.eval_every=3",
      "--config.eval_steps=1",
      "--config.checkpoint_every=3",
      f"--config.model.attention_impl={impl}",
      "--config.model.attention_block_q=256",
      "--config.model.attention_block_k=256",
    )
    train.run(config, str(tmp_path / impl))
    metrics = read_metrics(str(tmp_path / impl / "metrics.jsonl"))
    rows[impl] = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics if "loss" in r]
  assert [r[0] for r in rows["dense"]] == [1, 2, 3]
  np.testing.assert_allclose(np.array(rows["blockwise"]), np.array(rows["dense"]), rtol=1e-5)


def test_configs_long_trains_at_8192_input_tokens(tmp_path):
  """configs/long.py (blockwise attention at 8,192 encoder tokens) trains, at a tiny width for the CPU, on a
  corpus whose 6% held out (the config's eval_percent) makes an 8,533-token eval chunk."""
  import os
  import subprocess

  from conftest import ROOT, config_from, tiny_flags, train_command, write_corpus
  from t5jax.metrics import read_metrics

  flags = [
    f"--config={ROOT}/configs/long.py",
    *tiny_flags(write_corpus(str(tmp_path / "corpus.txt"), num_docs=5000)),
    "--config.data.inputs_length=8192",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
    "--config.batch_size=1",
    "--config.total_steps=2",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.eval_steps=1",
    "--config.checkpoint_every=2",
  ]
  assert config_from(*flags).model.attention_impl == "blockwise"
  # At 8,192 tokens running the steps, not compiling them, is the cost: XLA's optimizations (which the tests'
  # flags turn off, conftest.py) make that run twice as fast, so this one process has them back.
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run(train_command(tmp_path / "long", *flags), cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [r for r in read_metrics(str(tmp_path / "long" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_the_video_model_with_blockwise_attention_equals_dense():
  """VideoT5: a text prefix and a frame mask (a short clip's padded frames) reach the blockwise encoder."""
  from t5jax.model import T5Config, init_params
  from t5jax.model.video import VideoT5

  video = dict(video=dict(tubelet=(2, 8, 8), frames=6, size=(16, 16)))
  configs = [T5Config.from_dict(dict(TINY, **video, attention_impl=impl)).validate() for impl in ("dense", "blockwise")]
  params = init_params(configs[0], jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  frames = jnp.asarray(rng.integers(0, 255, (B, 6, 16, 16, 3)), jnp.uint8)
  inputs = dict(
    frame_mask=jnp.asarray(np.arange(6)[None] < np.array([[6], [4], [2]])), prefix_tokens=jnp.ones((B, 3), jnp.int32)
  )
  dec = jnp.asarray(rng.integers(2, 96, (B, 9)), jnp.int32)

  @functools.partial(jax.jit, static_argnums=0)  # jitted, as in the test above
  def forward(config, p):
    return VideoT5(config).apply({"params": p}, frames, dec, **inputs)

  def loss(config, p):
    return jnp.sum(forward(config, p) ** 2)

  want, got = (forward(c, params) for c in configs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  g_dense, g_block = (jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(c, params) for c in configs)
  for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_block), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * (float(jnp.max(jnp.abs(a))) or 1.0))


def test_predict_on_a_blockwise_workdir_writes_what_dense_attention_decodes(corpus_file, tmp_path):
  """`t5jax.predict` on a run trained with blockwise attention (its encoder and the decoder's first pass in 8 x 8
  tiles; cached steps dense) prints what the same params decode to with dense attention."""
  import dataclasses

  import t5jax
  from conftest import TINY_RUN_STEPS, predict_in_process, run_train, tiny_flags
  from t5jax import inference
  from t5jax.model import T5

  workdir = str(tmp_path / "run")
  blocks = ["--config.model.attention_impl=blockwise", "--config.model.attention_block_q=8"]
  out = run_train(workdir, *tiny_flags(corpus_file), *TINY_RUN_STEPS, *blocks, "--config.model.attention_block_k=8")
  assert out.returncode == 0, out.stderr[-2000:]
  texts = ["the model learns tokens from the encoder states of long documents", "attention heads"]
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  predict_in_process(
    checkpoint=workdir, input_file=str(tmp_path / "in.txt"), output_file=str(tmp_path / "out.txt"), max_new_tokens=12
  )
  _, params, config = t5jax.from_pretrained(workdir)
  assert config.attention_impl == "blockwise"
  tokenizer = inference.find_tokenizer(workdir, config)
  dense = T5(dataclasses.replace(config, attention_impl="dense"))
  want = inference.predict(
    dense, params, tokenizer, inference.encode_inputs(tokenizer, texts, 64, False), max_new_tokens=12
  )
  assert all(t[0] for t in want)  # words decoded, not an empty line for an immediate EOS
  assert (tmp_path / "out.txt").read_text() == "".join(t[0] + "\n" for t in want)

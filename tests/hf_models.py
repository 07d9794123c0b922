"""Tiny random transformers T5 models for the Hugging Face tests: one stand-in per published family, saved to
disk, a padded batch, and both sides' outputs. Imported after `pytest.importorskip` of torch and transformers."""

import os

import numpy as np
import torch
import transformers

from t5jax.model import T5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

# Tiny stand-ins for each published family; lengths below reach the log-spaced relative-position buckets.
SHAPES = {
  "v1.0": dict(
    vocab_size=300,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
  ),
  "v1.1": dict(
    vocab_size=300,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=48,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  ),
  "mt5": dict(
    vocab_size=30000,
    d_model=16,
    d_kv=4,
    num_heads=2,
    d_ff=24,
    num_layers=1,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  ),
  "byt5": dict(
    vocab_size=384,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=48,
    num_layers=3,
    num_decoder_layers=1,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  ),
  # d_kv * heads = 48 != d_model = 32, plus non-default buckets, distance, epsilon and activation.
  "d_kv": dict(
    vocab_size=300,
    d_model=32,
    d_kv=16,
    num_heads=3,
    d_ff=40,
    num_layers=2,
    num_decoder_layers=3,
    feed_forward_proj="gated-silu",
    tie_word_embeddings=False,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
    layer_norm_epsilon=1e-5,
  ),
}


# The shape conftest.tiny_flags gives configs/base.py (T5.1.1: gated-gelu, untied): a base for its tiny runs.
TINY_RUN = dict(
  vocab_size=512,
  d_model=32,
  d_kv=16,
  num_heads=2,
  d_ff=64,
  num_layers=2,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
)


def make_hf(directory, shape, seed=0):
  """A random-init transformers T5 of `shape` (a SHAPES name or a dict like them), saved to `directory`; an
  untied shape gets its own distinct lm_head."""
  spec = SHAPES[shape] if isinstance(shape, str) else shape
  torch.manual_seed(seed)
  cfg = transformers.T5Config(dropout_rate=0.0, decoder_start_token_id=0, **spec)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if not spec["tie_word_embeddings"]:
    # transformers v5 ties lm_head to shared even for v1.1; real v1.1 checkpoints hold a separate head.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model**-0.5)
  model.save_pretrained(directory)
  return model


def batch(vocab, seed=0):
  """A padded batch of unequal lengths: encoder 20 and 13 tokens, decoder 9 and 6."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (2, 20))
  mask = np.ones((2, 20), np.int64)
  mask[1, 13:] = 0
  dec = rng.integers(3, vocab, (2, 9))
  dec[:, 0] = 0  # decoder start token
  dmask = np.ones((2, 9), np.int64)
  dmask[1, 6:] = 0
  return ids * mask, mask, dec * dmask, dmask


def hf_outputs(model, ids, mask, dec, dmask):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      decoder_input_ids=torch.tensor(dec),
      decoder_attention_mask=torch.tensor(dmask),
    )
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def our_outputs(params, config, ids, mask, dec, dmask):
  model = T5(config)
  encoded = model.apply({"params": params}, ids, mask, method=T5.encode)
  logits = model.apply({"params": params}, ids, dec, attention_mask=mask, decoder_attention_mask=dmask)
  return np.asarray(encoded), np.asarray(logits)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

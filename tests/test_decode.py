"""Tests of t5jax.decode: token-for-token equality with transformers' generate(), streaming, sampling, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import NEEDS_TORCH

pytestmark = pytest.mark.needs_torch
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)

import t5jax  # noqa: E402
from t5jax import decode  # noqa: E402
from t5jax.decode import init_cache  # noqa: E402
from t5jax.model import T5  # noqa: E402

# A v1.0 (tied, relu) and a v1.1 (untied, gated-gelu) shape, small enough to decode in milliseconds. Equal
# encoder/decoder depths: transformers 5.23 generate() fails (cache IndexError) when they differ.
SHAPES = {
  "v1.0": dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
  ),
  "v1.1": dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=48,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  ),
}
NEW_TOKENS = 12


def make_hf(directory, shape, seed=0):
  """A random transformers T5 saved to `directory`. EOS gets a boost so that some rows end early."""
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
    dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SHAPES[shape]
  )
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    if not SHAPES[shape]["tie_word_embeddings"]:  # transformers 5 reports True even for v1.1
      model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model**-0.5)
      model.lm_head.weight[1] *= 2.0
    else:
      model.shared.weight[1] *= 3.0
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  hf_model = make_hf(directory, request.param)
  model, params, _ = t5jax.from_pretrained(str(directory))
  return hf_model, model, params


def inputs(vocab, lengths=(11, 5, 8), seed=0):
  """A right-padded batch of unequal lengths, each row ending in EOS as a tokenizer would."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), max(lengths)), np.int64)
  for row, n in enumerate(lengths):
    ids[row, : n - 1] = rng.integers(3, vocab, n - 1)
    ids[row, n - 1] = 1
  return ids, (ids != 0).astype(np.int64)


def hf_generate(model, ids, mask, **kwargs):
  with torch.no_grad():
    out = model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      **kwargs,
    ).numpy()
  out = out[:, 1:]  # drop the decoder start token
  out = np.pad(out, ((0, 0), (0, NEW_TOKENS - out.shape[1])))  # HF stops once every row has ended
  # HF's beam search fills a finished hypothesis with EOS rather than pad; our contract is pad.
  after_eos = np.cumsum(np.cumsum(out == 1, axis=1), axis=1) > 1
  return np.where(after_eos, 0, out)


def test_greedy_matches_transformers(pair):
  hf_model, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  ours = np.asarray(decode.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS))
  want = hf_generate(hf_model, ids, mask)
  np.testing.assert_array_equal(ours, want)
  assert (want == 1).any() and (want[:, -1] != 0).any()  # some rows end early, some run to the limit


@pytest.mark.parametrize(
  "num_beams,early_stopping,length_penalty", [(3, False, 1.0), (4, True, 0.6), (3, "never", 2.0)]
)
def test_beam_search_matches_transformers(pair, num_beams, early_stopping, length_penalty):
  hf_model, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  want = hf_generate(
    hf_model,
    ids,
    mask,
    num_beams=num_beams,
    early_stopping=early_stopping,
    length_penalty=length_penalty,
    num_return_sequences=2,
  )
  ours = decode.generate(
    model,
    params,
    ids,
    mask,
    strategy="beam",
    max_new_tokens=NEW_TOKENS,
    num_beams=num_beams,
    num_return_sequences=2,
    length_penalty=length_penalty,
    length_penalty_style="hf",
    early_stopping=early_stopping,
  )
  np.testing.assert_array_equal(np.asarray(ours), want)


def test_min_length_matches_transformers_min_new_tokens(pair):
  hf_model, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  want = hf_generate(hf_model, ids, mask, min_new_tokens=6)
  ours = decode.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, min_length=6)
  np.testing.assert_array_equal(np.asarray(ours), want)
  assert not (want[:, :5] == 1).any()


def test_t5x_beam_search_runs_and_ranks(pair):
  _, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  out = np.asarray(
    decode.generate(
      model, params, ids, mask, strategy="beam", num_beams=4, num_return_sequences=4, max_new_tokens=NEW_TOKENS
    )
  )
  assert out.shape == (3 * 4, NEW_TOKENS)
  # Each row is zero after its first EOS.
  for row in out:
    ends = np.flatnonzero(row == 1)
    if ends.size:
      assert not row[ends[0] + 1 :].any()


def test_streaming_gives_the_same_tokens(pair):
  _, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  for kwargs in (
    dict(strategy="greedy"),
    dict(strategy="sample", top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=2, rng=jax.random.key(3)),
  ):
    full = np.asarray(decode.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs))
    steps = np.stack(list(decode.stream(model, params, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs)), 1)
    np.testing.assert_array_equal(steps, full[:, : steps.shape[1]])
    assert not full[:, steps.shape[1] :].any()


def test_streaming_text_pieces_join_to_the_decoded_text(pair):
  _, model, params = pair

  class Chars:  # a stand-in tokenizer: id i -> one character, stopping at EOS
    def decode(self, ids):
      out = []
      for i in ids:
        if i == 1:
          break
        out.append(chr(ord("A") + i % 26) if i else "")
      return "".join(out)

  ids, mask = inputs(model.config.vocab_size)
  full = np.asarray(decode.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS))
  pieces = list(decode.stream(model, params, ids, mask, max_new_tokens=NEW_TOKENS, tokenizer=Chars()))
  for row in range(len(ids)):
    assert "".join(p[row] for p in pieces) == Chars().decode(full[row].tolist())


def test_sampling_respects_top_k_and_seed(pair):
  _, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  run = lambda key, **kw: np.asarray(
    decode.generate(
      model, params, ids, mask, strategy="sample", max_new_tokens=NEW_TOKENS, eos_id=None, rng=jax.random.key(key), **kw
    )
  )
  np.testing.assert_array_equal(run(0), run(0))
  assert (run(0) != run(1)).any()
  # top_k=1 and a tiny top_p both collapse sampling onto the greedy choice.
  greedy = np.asarray(decode.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_id=None))
  np.testing.assert_array_equal(run(5, top_k=1), greedy)
  np.testing.assert_array_equal(run(6, top_p=1e-6), greedy)


def test_cached_cross_attention_matches_full_forward(pair):
  """Teacher-forced steps with the cross-attention cache give the full forward's logits."""
  _, model, params = pair
  ids, mask = inputs(model.config.vocab_size)
  dec = np.random.default_rng(1).integers(2, model.config.vocab_size, (3, 7))
  dec[:, 0] = 0
  full = model.apply({"params": params}, ids, dec, attention_mask=mask)
  encoded = model.apply({"params": params}, ids, mask, method=T5.encode)
  cache = init_cache(model.config, params, encoded, mask, 7)
  assert "cross_key" in cache["decoder"]["layers_0"]["cross_attention"]
  step = jax.jit(lambda c, t: decode._decoder_step(model.config, params, c, jnp.zeros_like(encoded), mask, t))
  for t in range(7):  # zeros for `encoded`: a step must read the cached keys/values, not the encodings
    logits, cache = step(cache, jnp.asarray(dec[:, t]))
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(strategy="sample", num_beams=4), "beam search with sampling"),
    (dict(strategy="greedy", num_beams=2), "needs strategy='beam'"),
    (dict(strategy="nucleus"), "unknown strategy"),
    (dict(strategy="sample", temperature=0.0), "temperature"),
    (dict(strategy="beam", num_beams=2, num_return_sequences=3), "exceeds num_beams"),
    (dict(strategy="greedy", num_return_sequences=2), "greedy"),
  ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    decode.settings(**kwargs)

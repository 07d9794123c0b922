"""Eval metrics on decoded text, and the greedy decoder evaluate.py falls back on."""

import numpy as np
import pytest

from t5jax import evaluate


def test_exact_match_and_accuracy():
  assert evaluate.exact_match(["a b", "c", "d"], ["a b", "c ", "d"]) == {"exact_match": pytest.approx(200 / 3)}
  assert evaluate.accuracy(["acceptable", "unacceptable"], ["acceptable", "acceptable"]) == {"accuracy": 50.0}


def test_bleu_and_rouge():
  ref = ["the cat sat on the mat", "a dog barks loudly at night"]
  assert evaluate.bleu(ref, ref)["bleu"] == pytest.approx(100.0)
  assert 0 < evaluate.bleu(ref, ["the cat sat on a mat", "a dog barks at night"])["bleu"] < 100
  r = evaluate.rouge(ref, ref)
  assert set(r) == {"rouge1", "rouge2", "rougeLsum"} and all(v == pytest.approx(100.0) for v in r.values())
  assert evaluate.rouge(ref, ["cat mat", "dog night"])["rouge1"] < 70


def test_stsb_correlations():
  t = [0.0, 1.2, 2.4, 3.6, 5.0]
  assert evaluate.pearson(t, t)["pearson"] == pytest.approx(100.0)
  assert evaluate.spearman(t, [0.2, 1.0, 3.0, 3.2, 4.8])["spearman"] == pytest.approx(100.0)
  assert evaluate.pearson(t, [2.0] * 5)["pearson"] == 0.0  # constant prediction: no NaN
  with pytest.raises(ValueError, match="unknown metric 'f1'.*exact_match"):
    evaluate.compute_metrics(["f1"], t, t)


def test_greedy_fallback_stops_at_eos():
  import jax
  from t5jax.model import T5, T5Config, get_preset, init_params
  config = T5Config.from_dict(dict(get_preset("t5.1.1-tiny"), vocab_size=64))
  model = T5(config)
  params = init_params(config, jax.random.PRNGKey(0))
  inputs = np.random.default_rng(0).integers(3, 64, (3, 10)).astype(np.int32)
  out = np.asarray(evaluate._greedy_no_cache(model, params, inputs, 6, 1))
  assert out.shape == (3, 6) and out.dtype == np.int32
  # Greedy: each token is the argmax of the full forward pass on the tokens before it.
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), out[:, :-1]], 1)
  logits = model.apply({"params": params}, inputs, dec_in)
  first_eos = [list(r).index(1) if 1 in r else 6 for r in out]
  for b in range(3):
    n = first_eos[b]
    np.testing.assert_array_equal(out[b, :n + 1][: 6], np.argmax(logits[b], -1)[: min(n + 1, 6)])
    assert (out[b, n + 1:] == 0).all()

"""Eval metrics on decoded text."""

import pytest

from t5jax import evaluation


def test_exact_match_and_accuracy():
  assert evaluation.exact_match(["a b", "c", "d"], ["a b", "c ", "d"]) == {"exact_match": pytest.approx(200 / 3)}
  assert evaluation.accuracy(["acceptable", "unacceptable"], ["acceptable", "acceptable"]) == {"accuracy": 50.0}


def test_bleu_and_rouge():
  ref = ["the cat sat on the mat", "a dog barks loudly at night"]
  assert evaluation.bleu(ref, ref)["bleu"] == pytest.approx(100.0)
  assert 0 < evaluation.bleu(ref, ["the cat sat on a mat", "a dog barks at night"])["bleu"] < 100
  r = evaluation.rouge(ref, ref)
  assert set(r) == {"rouge1", "rouge2", "rougeLsum"} and all(v == pytest.approx(100.0) for v in r.values())
  assert evaluation.rouge(ref, ["cat mat", "dog night"])["rouge1"] < 70


def test_stsb_correlations():
  t = [0.0, 1.2, 2.4, 3.6, 5.0]
  assert evaluation.pearson(t, t)["pearson"] == pytest.approx(100.0)
  assert evaluation.spearman(t, [0.2, 1.0, 3.0, 3.2, 4.8])["spearman"] == pytest.approx(100.0)
  assert evaluation.pearson(t, [2.0] * 5)["pearson"] == 0.0  # constant prediction: no NaN
  with pytest.raises(ValueError, match="unknown metric 'f1'.*exact_match"):
    evaluation.compute_metrics(["f1"], t, t)

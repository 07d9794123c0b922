"""UL2's denoisers and mixture: realised densities, spans and rates, exact reconstruction, mode tokens, resume."""

import dataclasses
import os

import numpy as np
import pytest

from configs import ul2 as ul2_config
from conftest import NO_LOADER_WORKERS, ROOT, assert_resumes_exactly, config_from, tiny_flags
from t5jax import evaluation
from t5jax.data import denoisers, pipeline, specs
from t5jax.data.denoisers import PREFIX_LM, Denoiser, MixtureStep
from t5jax.data.tokenizer import Tokenizer, train_sentencepiece, write_hf_tokenizer

VOCAB = 32100
SENTINELS = 2000  # ids at the top taken as sentinels: 6,144-token rows at mu = 3 have ~1,400 spans
MODE_IDS = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}
PAPER = denoisers.denoisers_from_config(ul2_config.get_config().data)


def step_fn(ds, inputs_length, chunks=None):
  return MixtureStep(
    chunks, ds, MODE_IDS, seed=0, vocab_size=VOCAB, eos_id=1, inputs_length=inputs_length, shard_index=0, shard_count=1
  )


def distinct_rows(batch, length, seed=0):
  """Rows of distinct ids (a permutation of the non-special, non-sentinel ids), so every token says where it was."""
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.arange(6, VOCAB - SENTINELS, dtype=np.int32))
  starts = rng.integers(0, len(ids), size=(batch, 1))
  return ids[(starts + np.arange(length)) % len(ids)]  # each row a window of one permutation, wrapping around


def split_row(inputs, targets, d):
  """(text of the inputs after the mode token, up to EOS; targets up to EOS), checking the mode token."""
  assert inputs[0] == MODE_IDS[d.mode]
  inp = inputs[1:]
  return inp[: np.flatnonzero(inp == 1)[0]], targets[: np.flatnonzero(targets == 1)[0]]


def reconstruct(inputs, targets):
  """Span corruption undone: each sentinel of the inputs replaced by its span from the targets."""
  spans, current = {}, None
  for t in targets:
    if t >= VOCAB - SENTINELS:
      current = spans.setdefault(int(t), [])
    else:
      current.append(int(t))
  return [x for t in inputs for x in (spans[int(t)] if t >= VOCAB - SENTINELS else [int(t)])]


def test_paper_configuration():
  by_name = {d.name: d for d in PAPER}
  assert {(d.mean_span, d.noise_density, d.mode) for d in PAPER if d.objective != PREFIX_LM} == {
    (3.0, 0.15, "[NLU]"),
    (8.0, 0.15, "[NLU]"),
    (3.0, 0.5, "[NLG]"),
    (8.0, 0.5, "[NLG]"),
    (64.0, 0.15, "[NLG]"),
    (64.0, 0.5, "[NLG]"),
  }
  assert (by_name["s"].objective, by_name["s"].mode, by_name["s"].noise_density) == (PREFIX_LM, "[S2S]", 0.25)
  assert sum(d.rate for d in PAPER) == pytest.approx(1.0) and by_name["s"].rate == pytest.approx(0.2)


@pytest.mark.parametrize("d", PAPER, ids=lambda d: d.name)
def test_each_denoiser_realises_its_density_and_span_and_reconstructs(d):
  # 6,144 encoder tokens: long enough for the mu = 64 spans to come out within 2% of 64 by T5's rounding.
  inputs_length, rows = (6144, 8) if d.objective != PREFIX_LM else (128, 4000)
  d = dataclasses.replace(d, sentinels=SENTINELS)  # as many spans as 6,144 tokens make
  raw, targets_length = d.lengths(inputs_length)
  tokens = distinct_rows(rows, raw)
  inputs, targets, _ = step_fn([d], inputs_length).denoise(tokens, np.random.default_rng(1))
  assert inputs.shape == (rows, inputs_length) and targets.shape == (rows, targets_length)
  shares, noise, spans = [], 0, 0
  for row in range(rows):
    inp, tgt = split_row(inputs[row], targets[row], d)
    if d.objective == PREFIX_LM:
      assert len(inp) + len(tgt) == raw and (inp == tokens[row, : len(inp)]).all()  # a true prefix
      assert (tgt == tokens[row, len(inp) :]).all() and len(tgt) >= 1
      shares.append(len(tgt) / raw)
      continue
    assert (inputs[row] != 0).all()  # mode token + inputs fill the encoder exactly
    sentinels = tgt[tgt >= VOCAB - SENTINELS]
    np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(len(sentinels)))  # count down from the top
    np.testing.assert_array_equal(inp[inp >= VOCAB - SENTINELS], sentinels)
    assert reconstruct(inp, tgt) == tokens[row].tolist()
    noise, spans = noise + len(tgt) - len(sentinels), spans + len(sentinels)
  if d.objective == PREFIX_LM:
    assert np.mean(shares) == pytest.approx(d.noise_density, rel=0.02)
  else:
    assert noise / (rows * raw) == pytest.approx(d.noise_density, rel=0.02)
    assert noise / spans == pytest.approx(d.mean_span, rel=0.02)


def test_mixture_rates_windows_and_fixed_shapes():
  inputs_length = 128
  chunk_length, targets_length = denoisers.mixture_lengths(PAPER, inputs_length)
  tokens = distinct_rows(20_000, chunk_length)
  fn = step_fn(PAPER, inputs_length)
  inputs, targets, choice = fn.denoise(tokens, np.random.default_rng(2))
  assert inputs.shape == (20_000, 128) and targets.shape == (20_000, targets_length)
  rates = np.bincount(choice, minlength=len(PAPER)) / len(choice)
  np.testing.assert_allclose(rates, [d.rate for d in PAPER], atol=0.01)
  for row in range(0, 20_000, 97):  # every row: its mode token, and a contiguous window of its chunk back
    d = PAPER[choice[row]]
    inp, tgt = split_row(inputs[row], targets[row], d)
    text = np.concatenate([inp, tgt]) if d.objective == PREFIX_LM else np.array(reconstruct(inp, tgt))
    start = int(np.flatnonzero(tokens[row] == text[0])[0])
    np.testing.assert_array_equal(text, tokens[row, start : start + len(text)])
    assert len(text) == d.lengths(inputs_length)[0]


@pytest.fixture(scope="module")
def mode_tokenizer(tmp_path_factory, corpus_file):
  path = str(tmp_path_factory.mktemp("spm") / "modes.model")
  return Tokenizer(train_sentencepiece(corpus_file, path, 300, user_defined_symbols=tuple(MODE_IDS)))


def test_mode_tokens_are_fixed_ids_and_hf_gives_the_same(mode_tokenizer, tmp_path):
  tok = mode_tokenizer
  assert tok.user_pieces == MODE_IDS
  plain = tok.encode("the model learns tokens")
  assert tok.encode("[S2S] the model learns tokens", add_eos=True) == [5] + plain + [1]
  assert tok.encode("[NLG]the model learns tokens") == [4] + plain
  assert tok.encode_batch(["[NLU] the model learns tokens", "the model"]) == [[3] + plain, tok.encode("the model")]
  assert tok.decode([5] + plain).startswith("[S2S]")
  transformers = pytest.importorskip("transformers")
  write_hf_tokenizer(tok, tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in ("[S2S] the model learns tokens", "a decoder [NLU] reads", "[NLG]spans of words", "no mode here"):
    assert hf(text).input_ids == tok.encode(text, add_eos=True), text


def test_pipeline_batches_match_spec_and_are_pure_functions_of_the_step(corpus_file, tmp_path):
  for kind in ("ul2", "prefix_lm"):
    config = config_from(f"--config={ROOT}/configs/ul2.py", *tiny_flags(corpus_file), f"--config.data.kind={kind}")
    data = pipeline.from_config(config, str(tmp_path / "cache"))
    assert data.tokenizer.user_pieces == MODE_IDS
    spec = specs.text_spec(config, config.batch_size)
    batch = data.train[3]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    again = pipeline.from_config(config, str(tmp_path / "cache")).train[3]
    for k in batch:
      np.testing.assert_array_equal(batch[k], again[k])
    halves = [pipeline.from_config(config, str(tmp_path / "cache"), i, 2).train[3] for i in (0, 1)]
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k])
    first = set(batch["encoder_input_tokens"][:, 0].tolist())
    assert first <= set(MODE_IDS.values()) and (first == {5}) == (kind == "prefix_lm")


def test_bad_denoiser_settings_are_named():
  config = ul2_config.get_config()
  config.data.ul2.denoisers.r_mu3.mode = "[XYZ]"
  with pytest.raises(ValueError, match="config.data.ul2.denoisers.r_mu3"):
    denoisers.denoisers_from_config(config.data)
  config = ul2_config.get_config()
  config.data.ul2.denoisers.s.noise_density = 0.7
  with pytest.raises(ValueError, match="config.data.ul2.denoisers.s"):
    denoisers.denoisers_from_config(config.data)


def test_ul2_resumes_exactly_after_sigkill_and_evaluates_its_continuations(tmp_path, corpus_file):
  import subprocess
  import sys

  from t5jax.metrics import read_metrics

  assert os.path.isfile(os.path.join(ROOT, "configs", "ul2.py"))
  assert_resumes_exactly(tmp_path, corpus_file, 6, 3, f"--config={ROOT}/configs/ul2.py", NO_LOADER_WORKERS)
  # `t5jax.evaluate` on the finished run: greedy continuations of held-out text, scored on 32 tokens.
  workdir = str(tmp_path / "reference")
  out = subprocess.run(
    [sys.executable, "-m", "t5jax.evaluate", f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  (row,) = read_metrics(os.path.join(workdir, "eval_metrics.jsonl"))
  assert 0 <= row["decode_continuation_token_accuracy"] <= 100 and row["decode_continuation_num_examples"] > 0


def test_denoiser_lengths_follow_t5s_rule():
  d = Denoiser("r", "span", "[NLU]", 3.0, 0.15, 1.0)
  assert d.lengths(513) == (568, 114)  # span corruption's 568 -> 512, plus the mode token
  # (mu 3, r 0.5) filling 512 encoder tokens would make 127 spans: it reads 602 raw tokens instead, 100 spans.
  x = Denoiser("x", "span", "[NLG]", 3.0, 0.5, 1.0)
  assert x.lengths(512) == (602, 402) and x.num_sentinels(512) == 100


def test_continuation_examples_are_prefix_then_next_tokens():
  chunks = distinct_rows(3, 60)
  inputs, truth = evaluation.continuation_examples(chunks, 32, 8, mode_id=5)
  assert inputs.shape == (3, 32) and truth.shape == (3, 8)
  assert (inputs[:, 0] == 5).all() and (inputs[:, 31] == 1).all()  # [S2S], 30 prefix tokens, EOS
  np.testing.assert_array_equal(inputs[:, 1:31], chunks[:, :30])
  np.testing.assert_array_equal(truth, chunks[:, 30:38])
  inputs, truth = evaluation.continuation_examples(chunks[:, :20], 32, 8)  # short rows: a shorter prefix
  np.testing.assert_array_equal(inputs[:, :13], np.concatenate([chunks[:, :12], np.ones((3, 1), np.int32)], 1))
  np.testing.assert_array_equal(truth, chunks[:, 12:20])


def test_sentinel_prompt_scores_what_follows_the_answered_sentinel():
  # A span-corruption model is asked T5's way (prefix + <extra_id_0> + EOS) and answers <extra_id_0> first:
  # held-out rows whose continuation is the model's own greedy output after that first token score 100.
  import types

  import jax

  from t5jax import decode
  from t5jax.model import T5, T5Config, init_params

  config = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
  model, params = T5(config), init_params(config, jax.random.key(0))
  tokenizer = types.SimpleNamespace(user_pieces={}, sentinel_id=lambda i: 63 - i)
  chunks = distinct_rows(4, 40) % 50 + 2
  inputs, _ = evaluation.continuation_examples(chunks, 16, 6, sentinel_id=63)
  assert (inputs[:, 14:] == [63, 1]).all()  # 14 prefix tokens, the sentinel, EOS
  out = np.asarray(decode.generate(model, params, inputs, inputs != 0, max_new_tokens=7, eos_id=None))
  chunks[:, 14:20] = out[:, 1:]
  data = types.SimpleNamespace(tokenizer=tokenizer, eval_chunks=chunks, inputs_length=16)
  scores = evaluation.evaluate_continuations(model, params, data, num_tokens=6, prompt="sentinel")["continuation"]
  assert scores["token_accuracy"] == scores["exact_match"] == 100.0 and scores["num_examples"] == 4
  with pytest.raises(ValueError, match="continuation_prompt"):
    evaluation.evaluate_continuations(model, params, data, prompt="mode")

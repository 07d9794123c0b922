"""Switch Transformers parity: random transformers SwitchTransformers models saved to disk, imported, compared
to 1e-4 (with and without tokens dropped by the expert capacity), exported back, decoded by predict."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import NEEDS_TORCH

pytestmark = pytest.mark.needs_torch
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)

import t5jax  # noqa: E402
from t5jax import convert  # noqa: E402
from t5jax.hf import t5 as hf  # noqa: E402
from t5jax.model import T5, moe, param_shapes  # noqa: E402
from hf_models import ROOT, TOL, batch, hf_outputs, max_diff, our_outputs  # noqa: E402

# Encoder layer 1 of 3 and decoder layer 1 of 2 sparse (num_sparse_*=1: steps 3 and 2), 4 experts.
SHAPE = dict(
  vocab_size=300,
  d_model=32,
  d_kv=8,
  num_heads=4,
  d_ff=48,
  num_layers=3,
  num_decoder_layers=2,
  num_experts=4,
  num_sparse_encoder_layers=1,
  num_sparse_decoder_layers=1,
)


def make_switch(directory, expert_capacity, seed=0, **overrides):
  """A random-init transformers Switch model saved to `directory`."""
  torch.manual_seed(seed)
  cfg = transformers.SwitchTransformersConfig(
    dropout_rate=0.0, decoder_start_token_id=0, expert_capacity=expert_capacity, **{**SHAPE, **overrides}
  )
  model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
  model.save_pretrained(directory)
  return model


def fraction_dropped(params, config, ids, mask, dec, dmask):
  """Our model's share of routed tokens over capacity, averaged over the sparse layers (deterministic)."""
  _, mutated = T5(config).apply(
    {"params": params}, ids, dec, attention_mask=mask, decoder_attention_mask=dmask, mutable=moe.COLLECTIONS
  )
  return float(moe.summarize(mutated)[1]["fraction_dropped"])


@pytest.mark.parametrize("capacity,drops", [(64, False), (3, True)])
def test_parity_on_a_padded_batch(capacity, drops, tmp_path):
  model = make_switch(tmp_path, capacity)
  params, config = hf.load_hf(str(tmp_path))
  assert (config.num_experts, config.moe.expert_capacity, config.moe.top_k) == (4, capacity, 1)
  assert [config.is_sparse("encoder", i) for i in range(3)] == [False, True, False]
  assert [config.is_sparse("decoder", i) for i in range(2)] == [False, True]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, param_shapes(config))
  data = batch(config.vocab_size)
  # 20 and 9 tokens per sequence over 4 experts: 3 slots per expert must drop some, 64 none.
  assert (fraction_dropped(params, config, *data) > 0.05) == drops
  enc_hf, logits_hf = hf_outputs(model, *data)
  enc, logits = our_outputs(params, config, *data)
  assert max_diff(enc, enc_hf) <= TOL and max_diff(logits, logits_hf) <= TOL
  assert np.abs(logits_hf).max() > 0.1
  # The scanned layout (blocks of 3 encoder and 2 decoder layers) computes the same.
  scanned, scanned_config = hf.load_hf(str(tmp_path), scan_layers=True)
  assert max_diff(our_outputs(scanned, scanned_config, *data)[1], logits) <= 1e-5


@pytest.mark.parametrize("untied", [False, True])
def test_export_loads_back_in_transformers(untied, tmp_path):
  """import-hf then export-hf; transformers reads the export and computes the same logits."""
  model = make_switch(tmp_path / "hf", 3, tie_word_embeddings=not untied)
  if untied:  # a distinct head, as a v1.1-style model has, and one embedding table for both stacks
    model.lm_head.weight = torch.nn.Parameter(torch.randn(300, 32) * 32**-0.5)
    model.encoder.embed_tokens.weight = model.decoder.embed_tokens.weight = model.shared.weight
    model.save_pretrained(tmp_path / "hf")
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  convert.export_hf(str(tmp_path / "ours"), str(tmp_path / "out"))
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["model_type"] == "switch_transformers" and exported["expert_capacity"] == 3
  assert (exported["num_sparse_encoder_layers"], exported["num_sparse_decoder_layers"]) == (1, 1)
  back = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  data = batch(300)
  want = hf_outputs(model, *data)[1]
  assert max_diff(hf_outputs(back, *data)[1], want) <= TOL
  _, params, config = t5jax.from_pretrained(str(tmp_path / "ours"))
  assert config.tie_word_embeddings == (not untied)
  assert max_diff(our_outputs(params, config, *data)[1], want) <= TOL


def test_a_capacity_factor_model_exports_without_drops(tmp_path):
  """A model trained with T5X capacity factors has no per-sequence capacity: the export drops nothing, and
  transformers computes what our model does with ample capacity."""
  from t5jax.model import T5Config, init_params

  config = T5Config.from_dict(
    dict(
      vocab_size=300,
      d_model=32,
      num_heads=4,
      d_kv=8,
      d_ff=48,
      num_encoder_layers=2,
      num_decoder_layers=2,
      moe=dict(num_experts=4, every_encoder=1, every_decoder=2),
    )
  ).validate()
  params = init_params(config, jax.random.PRNGKey(0))
  hf.save_hf(params, config, str(tmp_path))
  back = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert back.config.encoder_sparse_step == 1 and back.config.decoder_sparse_step == 2
  data = batch(300)
  ample = dataclasses.replace(
    config, moe=dataclasses.replace(config.moe, capacity_factor_eval=4.0)
  )  # = experts: every token fits
  assert max_diff(hf_outputs(back, *data)[1], our_outputs(params, ample, *data)[1]) <= TOL


def test_unsupported_settings_are_one_line_errors_naming_them(tmp_path):
  make_switch(tmp_path, 4, router_bias=True)
  with pytest.raises(ValueError, match=r"config.json: router_bias=True is not supported"):
    hf.load_hf(str(tmp_path))
  make_switch(tmp_path / "untied", 4, tie_word_embeddings=False)  # each stack has its own random table
  with pytest.raises(ValueError, match=r"model.safetensors: tensor encoder.embed_tokens.weight differs from shared"):
    hf.load_hf(str(tmp_path / "untied"))
  config = hf.config_from_hf({"model_type": "switch_transformers", **SHAPE}, untied=False)
  # Export: top-2, gated experts, and a placement no num_sparse_encoder_layers gives (layers 1, 6, 11 of 12).
  for change, name in (
    (dict(moe=dataclasses.replace(config.moe, top_k=2)), "moe.top_k=2"),
    (dict(feed_forward_proj="gated-gelu"), "feed_forward_proj"),
    (
      dict(moe=dataclasses.replace(config.moe, every_encoder=5), num_encoder_layers=12),
      r"moe.every_encoder=5 .*\[1, 6, 11\]",
    ),
  ):
    with pytest.raises(ValueError, match=name):
      hf.hf_config_dict(dataclasses.replace(config, **change))


def test_predict_gives_the_greedy_text_of_generate(tmp_path):
  """predict on a Switch directory (2 slots per expert: the encoder drops tokens) writes the text that
  transformers' greedy generate() gives."""
  from conftest import write_corpus
  from t5jax.data.tokenizer import load_tokenizer, train_sentencepiece

  model = make_switch(tmp_path, 2)
  train_sentencepiece(
    write_corpus(str(tmp_path / "corpus.txt"), num_docs=300), tmp_path / "spiece.model", 120, byte_fallback=False
  )
  tokenizer = load_tokenizer(str(tmp_path))
  texts = ["the model learns tokens from text while spans are masked", "a decoder reads"]
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "t5jax.predict",
      f"--checkpoint={tmp_path}",
      "--max_new_tokens=10",
      f"--input_file={tmp_path / 'in.txt'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for text, got in zip(texts, out.stdout.splitlines(), strict=True):
    ids = torch.tensor([tokenizer.encode(text, add_eos=True)])
    with torch.no_grad():
      want = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, num_beams=1)[0, 1:]
    assert got == tokenizer.decode(want.tolist()) and got.strip()

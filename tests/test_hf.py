"""Hugging Face T5 parity: random transformers models saved to disk, imported, compared to 1e-4; export back."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import NEEDS_TORCH

pytestmark = pytest.mark.needs_torch
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)

from t5jax.hf import t5 as hf  # noqa: E402
from t5jax.decode import init_cache  # noqa: E402
from t5jax.model import T5, layer_stack, param_shapes  # noqa: E402
from hf_models import SHAPES, TOL, batch, hf_outputs, make_hf, max_diff, our_outputs  # noqa: E402


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parity(shape, tmp_path):
  model = make_hf(tmp_path, shape)
  params, config = hf.load_hf(str(tmp_path))
  spec = SHAPES[shape]
  assert config.d_kv == spec["d_kv"] and config.num_decoder_layers == spec.get("num_decoder_layers", spec["num_layers"])
  assert config.tie_word_embeddings == spec["tie_word_embeddings"]
  assert config.feed_forward_proj == spec["feed_forward_proj"]
  # The tree is exactly the model's: same paths, same shapes.
  want = jax.tree.map(lambda s: s.shape, param_shapes(config))
  assert jax.tree.map(np.shape, params) == want
  data = batch(config.vocab_size)
  enc_hf, logits_hf = hf_outputs(model, *data)
  enc, logits = our_outputs(params, config, *data)
  assert max_diff(enc, enc_hf) <= TOL
  assert max_diff(logits, logits_hf) <= TOL
  assert np.abs(logits_hf).max() > 0.1  # not trivially small


def test_untied_flag_from_v4_config(tmp_path):
  """A v4-era config.json (tie_word_embeddings=false, no scale_decoder_outputs) reads the same way."""
  model = make_hf(tmp_path, "v1.1")
  path = tmp_path / "config.json"
  cfg = json.loads(path.read_text())
  cfg.pop("scale_decoder_outputs", None)
  cfg["tie_word_embeddings"] = False
  path.write_text(json.dumps(cfg))
  params, config = hf.load_hf(str(tmp_path))
  assert not config.tie_word_embeddings
  assert max_diff(our_outputs(params, config, *batch(300))[1], hf_outputs(model, *batch(300))[1]) <= TOL


def test_cached_decoding_matches_past_key_values(tmp_path):
  model = make_hf(tmp_path, "d_kv")
  params, config = hf.load_hf(str(tmp_path))
  ids, mask, dec, _ = batch(config.vocab_size)
  ours = T5(config)
  encoded = ours.apply({"params": params}, ids, mask, method=T5.encode)
  cache = init_cache(config, params, encoded, mask, max_decode_len=dec.shape[1])
  step = jax.jit(
    lambda cache, tok: ours.apply(
      {"params": params, "cache": cache}, encoded, mask, tok, decode=True, method=T5.decode, mutable=["cache"]
    )
  )
  with torch.no_grad():
    enc_out = model.get_encoder()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    past = None
    for t in range(dec.shape[1]):
      out = model(
        encoder_outputs=enc_out,
        attention_mask=torch.tensor(mask),
        decoder_input_ids=torch.tensor(dec[:, t : t + 1]),
        past_key_values=past,
        use_cache=True,
      )
      past = out.past_key_values
      logits, mut = step(cache, dec[:, t : t + 1])
      cache = mut["cache"]
      assert max_diff(logits, out.logits.numpy()) <= TOL, f"step {t}"


def test_round_trip_and_transformers_load(tmp_path):
  model = make_hf(tmp_path / "hf", "v1.1")
  params, config = hf.load_hf(str(tmp_path / "hf"))
  hf.save_hf(params, config, str(tmp_path / "out"))
  again, config2 = hf.load_hf(str(tmp_path / "out"))
  assert config2 == config
  assert jax.tree.structure(again) == jax.tree.structure(params)
  assert all(
    a.dtype == b.dtype and np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True)
  )
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
    str(tmp_path / "out"), output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  data = batch(config.vocab_size)
  assert max_diff(hf_outputs(loaded.eval(), *data)[1], hf_outputs(model, *data)[1]) <= 1e-6


def test_tied_export_loads(tmp_path):
  model = make_hf(tmp_path / "hf", "v1.0")
  params, config = hf.load_hf(str(tmp_path / "hf"))
  assert "lm_head" not in params
  hf.save_hf(params, config, str(tmp_path / "out"))
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
    str(tmp_path / "out"), output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  data = batch(config.vocab_size)
  assert max_diff(hf_outputs(loaded.eval(), *data)[1], hf_outputs(model, *data)[1]) <= 1e-6


def test_sharded_safetensors_and_torch_bin(tmp_path):
  model = make_hf(tmp_path / "one", "v1.0")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.isfile(tmp_path / "sharded" / hf.SAFETENSORS_INDEX)
  os.makedirs(tmp_path / "bin")
  model.config.save_pretrained(tmp_path / "bin")
  # A v4-style .bin holds every tied alias (embed_tokens, lm_head) as a tensor of its own.
  torch.save(model.state_dict(), tmp_path / "bin" / hf.TORCH_BIN)
  reference, _ = hf.load_hf(str(tmp_path / "one"))
  for name in ("sharded", "bin"):
    params, config = hf.load_hf(str(tmp_path / name))
    assert config.tie_word_embeddings
    assert jax.tree.all(jax.tree.map(np.array_equal, params, reference)), name


def test_scanned_import_matches_unscanned(tmp_path):
  make_hf(tmp_path, "byt5")
  flat, config = hf.load_hf(str(tmp_path))
  scanned, scan_config = hf.load_hf(str(tmp_path), scan_layers=True)
  assert scan_config.scan_layers and scanned["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape[0] == 3
  assert jax.tree.map(np.shape, scanned) == jax.tree.map(lambda s: s.shape, param_shapes(scan_config))
  data = batch(config.vocab_size)
  assert max_diff(our_outputs(scanned, scan_config, *data)[1], our_outputs(flat, config, *data)[1]) <= 1e-5
  assert jax.tree.all(jax.tree.map(np.array_equal, layer_stack.unstack_layers(scanned, scan_config), flat))


def _rewrite_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


def test_bad_inputs_name_the_file_and_shapes(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(str(tmp_path))
  transformers.BartConfig(d_model=16, vocab_size=50).save_pretrained(tmp_path / "bart")
  with pytest.raises(ValueError, match="model_type 'bart'.*not T5"):
    hf.load_hf(str(tmp_path / "bart"))
  good = str(tmp_path / "t5")
  make_hf(good, "v1.0")
  _rewrite_config(good, d_ff=80)
  with pytest.raises(
    ValueError,
    match=r"encoder.block.0.layer.1.DenseReluDense.wi.weight has shape "
    r"\(64, 32\) but config.json implies \(80, 32\)",
  ):
    hf.load_hf(good)
  _rewrite_config(good, d_ff=64, feed_forward_proj="gated-relu")
  with pytest.raises(ValueError, match="unknown feed_forward_proj 'gated-relu'"):
    hf.load_hf(good)
  _rewrite_config(good, feed_forward_proj="relu", num_layers=1, num_decoder_layers=2)
  with pytest.raises(ValueError, match="unexpected tensor encoder.block.1"):
    hf.load_hf(good)
  _rewrite_config(good, num_layers=3, num_decoder_layers=2)
  with pytest.raises(ValueError, match="tensor encoder.block.2.* is missing"):
    hf.load_hf(good)
  os.remove(os.path.join(good, hf.SAFETENSORS))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_hf(good)

"""Hugging Face checkpoints through the real entry points: `convert` (CLI and in process), a training workdir
read as a checkpoint, an import fine-tuned by `train` and exported with its tokenizer, and damaged files named
in one line."""

import json
import os
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
from t5jax.model import T5, param_shapes  # noqa: E402
from hf_models import ROOT, TINY_RUN, TOL, batch, hf_outputs, make_hf, max_diff, our_outputs  # noqa: E402


def test_from_pretrained_reads_a_training_workdir(tmp_path):
  """A workdir checkpoint with optimizer state restores its params without knowing the optimizer."""
  import optax
  from t5jax.workdir import checkpoint
  from t5jax.model import T5Config, get_preset, init_params

  config = T5Config.from_dict(get_preset("t5.1.1-tiny"))
  params = init_params(config, jax.random.key(1))
  state = {
    "params": params,
    "opt_state": optax.adafactor(1e-2).init(params),
    "step": np.int32(5),
    "rng": jax.random.PRNGKey(0),
  }
  ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", async_save=False)
  ckpts.save(5, state, {"data_position": 5, "config": {"model": config.to_dict(), "seed": 0}, "git": "x"})
  ckpts.close()
  model, restored, config2 = t5jax.from_pretrained(str(tmp_path))
  assert config2 == config and isinstance(model, T5)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), restored, params))
  _, scanned, scan_config = t5jax.from_pretrained(str(tmp_path), scan_layers=True)
  assert scan_config.scan_layers and "layers" in scanned["decoder"]


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "t5jax.convert", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_convert_cli_round_trip(tmp_path):
  hf_dir, ours, back = str(tmp_path / "hf"), str(tmp_path / "ours"), str(tmp_path / "back")
  model = make_hf(hf_dir, "v1.1")
  (tmp_path / "hf" / "spiece.model").write_bytes(b"not really a sentencepiece model")
  result = _cli("import-hf", hf_dir, ours)
  assert result.returncode == 0, result.stderr
  assert os.path.isdir(os.path.join(ours, "checkpoints", "0", "state"))
  assert os.path.isfile(os.path.join(ours, "spiece.model"))
  result = _cli("export-hf", ours, back)
  assert result.returncode == 0, result.stderr
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(back, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  data = batch(300)
  assert max_diff(hf_outputs(loaded.eval(), *data)[1], hf_outputs(model, *data)[1]) <= 1e-6
  # The Python API reads the converted directory too, and gives the transformers logits.
  _, params, config = t5jax.from_pretrained(ours)
  assert max_diff(our_outputs(params, config, *data)[1], hf_outputs(model, *data)[1]) <= TOL
  # Bad input: one line on stderr, exit 1, and an existing non-empty output is never touched.
  result = _cli("import-hf", hf_dir, back)
  assert result.returncode == 1 and "not empty" in result.stderr and back in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  result = _cli("import-hf", str(tmp_path / "missing"), str(tmp_path / "x"))
  assert result.returncode == 1 and "config.json" in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "x")


def test_convert_in_process_refuses_non_empty_out(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="out"):
    convert.import_hf(str(tmp_path), str(tmp_path / "out"))
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_load_params_for_adapts_layout_and_rejects_mismatch(tmp_path):
  """What train.py's init_from calls: the converted params in the run's layout, or a clear error."""
  import dataclasses

  make_hf(tmp_path / "hf", "byt5")
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  _, config = hf.load_hf(str(tmp_path / "hf"))
  scanned = dataclasses.replace(config, scan_layers=True)
  params = t5jax.load_params_for(str(tmp_path / "ours"), scanned)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, param_shapes(scanned))
  with pytest.raises(
    ValueError,
    match=r"param decoder/layers_0/mlp/wi_0/kernel has "
    r"shape \(32, 48\) but config.model implies \(32, 64\)",
  ):
    t5jax.load_params_for(str(tmp_path / "ours"), dataclasses.replace(config, d_ff=64))


def test_an_imported_checkpoint_finetunes_through_train_and_exports(tmp_path, corpus_file, tiny_run):
  """The whole round trip through the real CLIs: import-hf, train --config.init_from, export-hf, transformers."""
  from conftest import run_train, tiny_flags

  model = make_hf(tmp_path / "hf", TINY_RUN)
  assert _cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0

  flags = [
    *tiny_flags(corpus_file),
    "--config.total_steps=10",
    "--config.log_every=1",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
  ]
  out = run_train(str(tmp_path / "ft"), *flags, f"--config.init_from={tmp_path / 'ours'}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Initialized the weights from" in out.stdout
  first = lambda wd: json.loads(open(f"{wd}/metrics.jsonl").readline())["loss"]  # noqa: E731
  # tiny_run is the same model freshly initialized (its step-1 loss is the initial weights'): step 1 here
  # ran on the imported ones.
  assert first(tmp_path / "ft") != first(tiny_run)

  assert _cli("export-hf", str(tmp_path / "ft"), str(tmp_path / "back")).returncode == 0
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  _, params, config = t5jax.from_pretrained(str(tmp_path / "ft"))
  data = batch(512)
  assert max_diff(our_outputs(params, config, *data)[1], hf_outputs(loaded.eval(), *data)[1]) <= TOL
  assert max_diff(hf_outputs(loaded.eval(), *data)[1], hf_outputs(model, *data)[1]) > 1e-3  # it trained

  bad = run_train(str(tmp_path / "bad"), *flags, f"--config.init_from={tmp_path / 'ours'}", "--config.model.d_ff=128")
  assert bad.returncode == 1 and "has shape" in bad.stderr.strip().splitlines()[-1] and "Traceback" not in bad.stderr


def test_export_of_a_training_run_carries_its_tokenizer(tmp_path, tiny_run):
  """export-hf of a text-corpus run: transformers tokenizes as we do, predict reads the export, and import-hf
  of the export carries the tokenizer on."""
  from t5jax import inference
  from t5jax.workdir import record as workdir

  run, export = tiny_run, str(tmp_path / "export")
  convert.export_hf(run, export)
  ours = workdir.load_run_tokenizer(run)
  auto = transformers.AutoTokenizer.from_pretrained(export)
  # Punctuation, digits and accents are not in this corpus: the run's tokenizer gives their bytes.
  for text in ("the model learns tokens from text", "Hello, wörld 42!  two  spaces", "a decoder"):
    ids = ours.encode(text, add_eos=True)
    assert auto(text)["input_ids"] == ids, text
    assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids)
  assert auto.convert_tokens_to_ids("<extra_id_0>") == ours.sentinel_id(0) and len(auto) == ours.vocab_size
  t5 = transformers.T5Tokenizer.from_pretrained(export)  # loads too, though without byte fallback
  assert t5("the model learns")["input_ids"] == ours.encode("the model learns", add_eos=True)
  assert (
    os.stat(os.path.join(export, "model.safetensors")).st_mode == os.stat(os.path.join(export, "config.json")).st_mode
  )

  result = subprocess.run(
    [sys.executable, "-m", "t5jax.predict", f"--checkpoint={export}", "--input=the model learns"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
  convert.import_hf(export, str(tmp_path / "imported"))
  config = hf.read_hf_config(export)
  again = inference.find_tokenizer(str(tmp_path / "imported"), hf.config_from_hf(config, untied=True))
  assert again.encode("Hello, wörld 42!") == ours.encode("Hello, wörld 42!")


def test_a_tokenizer_without_byte_fallback_is_written_as_a_t5_tokenizer(tmp_path):
  """T5's own kind of model (no byte fallback): T5Tokenizer is exact, so tokenizer_config.json names it."""
  from conftest import write_corpus
  from t5jax.data.tokenizer import Tokenizer, train_sentencepiece, write_hf_tokenizer

  spm = train_sentencepiece(
    write_corpus(str(tmp_path / "corpus.txt"), num_docs=300), tmp_path / "sp.model", 120, byte_fallback=False
  )
  ours = Tokenizer(spm, extra_ids=7)
  write_hf_tokenizer(ours, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
  for cls in (transformers.AutoTokenizer, transformers.T5Tokenizer):
    tok = cls.from_pretrained(tmp_path / "out")
    assert type(tok).__name__ == "T5Tokenizer" and len(tok) == ours.vocab_size
    assert tok("the model learns tokens")["input_ids"] == ours.encode("the model learns tokens", add_eos=True)
    assert tok.convert_tokens_to_ids("<extra_id_6>") == ours.sentinel_id(6)


def test_conversions_without_a_tokenizer_warn_in_one_line(tmp_path, capsys):
  make_hf(tmp_path / "hf", "v1.0")  # weights and config only
  capsys.readouterr()  # transformers' progress bar
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  convert.export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 2 and all("has no tokenizer" in line for line in lines)
  assert str(tmp_path / "ours") in lines[0] and str(tmp_path / "back") in lines[1]


@pytest.mark.parametrize("damage", ["empty", "cut_in_header", "cut_in_data", "garbled_header"])
def test_a_truncated_or_corrupt_safetensors_is_one_line_naming_the_file(tmp_path, damage, capsys):
  make_hf(tmp_path / "hf", "v1.0")
  path = tmp_path / "hf" / hf.SAFETENSORS
  data = path.read_bytes()
  header_end = 8 + int.from_bytes(data[:8], "little")
  capsys.readouterr()
  path.write_bytes(
    {
      "empty": b"",
      "cut_in_header": data[: header_end // 2],
      "cut_in_data": data[:-100],
      "garbled_header": data[:10] + b"\x00" * 20 + data[30:],
    }[damage]
  )
  message = rf"{path}: truncated or corrupt safetensors file \({len(path.read_bytes()):,} bytes\)"
  with pytest.raises(ValueError, match=message):
    t5jax.from_pretrained(str(tmp_path / "hf"))
  with pytest.raises(ValueError, match=message):
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert convert.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "truncated or corrupt" in err[0] and not os.path.exists(tmp_path / "ours")

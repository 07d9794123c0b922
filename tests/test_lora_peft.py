"""LoRA adapters and Hugging Face PEFT, both ways: a t5jax LoRA run on a transformers T5, exported with
`convert export-peft`, loads with `peft.PeftModel.from_pretrained` and gives our logits; `import-peft` reads it
back; `export-hf --merge` writes the same model whole."""

import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

import t5jax
from conftest import ROOT, run_train, tiny_flags

pytestmark = pytest.mark.needs_torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import TINY_RUN, TOL, batch, hf_outputs, make_hf, max_diff, our_outputs  # noqa: E402


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "t5jax.convert", *args], cwd=ROOT, capture_output=True, text=True)


def test_peft_round_trip(tmp_path, corpus_file):
  model = make_hf(tmp_path / "hf", TINY_RUN)
  flags = [*tiny_flags(corpus_file), "--config.total_steps=6", "--config.eval_every=6", "--config.checkpoint_every=6"]
  lora = ["--config.finetune.lora.rank=4", "--config.finetune.lora.alpha=8", "--config.optimizer.learning_rate=0.05"]
  out = run_train(str(tmp_path / "lora"), *flags, f"--config.init_from={tmp_path / 'hf'}", *lora)
  assert out.returncode == 0, out.stderr[-2000:]

  assert _convert("export-peft", str(tmp_path / "lora"), str(tmp_path / "peft")).returncode == 0
  tuned = peft.PeftModel.from_pretrained(
    transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf"), tmp_path / "peft"
  ).eval()
  merged, config = t5jax.load_checkpoint(str(tmp_path / "lora"))
  data = batch(512)
  ours = our_outputs(merged, config, *data)[1]
  assert max_diff(ours, hf_outputs(tuned, *data)[1]) <= TOL
  assert max_diff(ours, hf_outputs(model, *data)[1]) > 1e-3  # the adapters moved the model

  # import-peft: the same adapters in a t5jax directory, on the same base (named by the adapter config).
  assert _convert("import-peft", str(tmp_path / "peft"), str(tmp_path / "back")).returncode == 0
  back, _ = t5jax.load_checkpoint(str(tmp_path / "back"))
  flat = traverse_util.flatten_dict(merged)
  for key, w in traverse_util.flatten_dict(back).items():
    np.testing.assert_allclose(w, flat[key], rtol=0, atol=1e-6, err_msg="/".join(key))

  # export-hf --merge: a plain T5 that transformers loads, with the adapters in its weights.
  assert _convert("export-hf", str(tmp_path / "lora"), str(tmp_path / "whole"), "--merge").returncode == 0
  whole = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "whole").eval()
  assert max_diff(hf_outputs(whole, *data)[1], hf_outputs(tuned, *data)[1]) <= TOL


def test_import_peft_refuses_what_is_not_plain_lora(tmp_path):
  (tmp_path / "peft").mkdir()
  (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true, "r": 4}')
  out = _convert("import-peft", str(tmp_path / "peft"), str(tmp_path / "out"), "--base", str(tmp_path))
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 1 and "use_dora=True is not plain LoRA" in last, last

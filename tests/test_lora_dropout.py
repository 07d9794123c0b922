"""LoRA's unmerged path (model/layers.py: lora_update): the layers applying adapters from the 'lora' collection
give the merged model's logits, in every layer layout; dropout drops the adapters' input only, draw by draw;
and a run with dropout trains through the CLI."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import run_train, tiny_config, tiny_flags
from t5jax import convert, lora
from t5jax.model import T5, T5Config, init_params
from t5jax.workdir import checkpoint


def _frozen(corpus, model_flags, dropout=0.0):
  """(model, FrozenBase, base argument, adapters with random B) of a tiny LoRA run on a random base."""
  config = tiny_config(corpus, "--config.init_from=unused", "--config.finetune.lora.rank=4", *model_flags)
  config.finetune.lora.dropout = dropout
  model_config = dataclasses.replace(T5Config.from_dict(config.model.to_dict()), lora_dropout=dropout)
  frozen = lora.build(config, model_config, load_params=None)
  flat = traverse_util.flatten_dict(init_params(model_config, jax.random.key(0)))
  base = frozen.to_base({k: np.asarray(v) for k, v in flat.items()})
  adapters = traverse_util.flatten_dict(frozen.init_adapters(jax.random.key(1)))
  for n, key in enumerate(sorted(adapters)):  # a trained adapter's B is not zero
    if key[-1] == "lora_b":
      adapters[key] = 0.1 * jax.random.normal(jax.random.key(2 + n), adapters[key].shape)
  return T5(model_config), frozen, base, traverse_util.unflatten_dict(adapters)


def _inputs():
  rng = np.random.default_rng(0)
  return rng.integers(2, 300, (2, 16)), rng.integers(2, 300, (2, 8))


@pytest.mark.parametrize(
  "model_flags",
  [
    (),
    ("--config.model.scan_layers=true", "--config.model.remat_policy=full"),
    ("--config.model.feed_forward_proj=relu",),
  ],
  ids=["gated", "scanned-remat", "relu"],
)
def test_unmerged_adapters_give_the_merged_models_logits(corpus_file, model_flags):
  model, frozen, base, adapters = _frozen(corpus_file, model_flags)
  variables = frozen.train_variables(base, adapters)
  assert traverse_util.flatten_dict(variables["lora"])  # every adapter goes to its layer, none merged
  for key, w in traverse_util.flatten_dict(variables["params"]).items():
    np.testing.assert_array_equal(w, np.asarray(base["/".join(key)]))
  unmerged = model.apply(variables, *_inputs())
  merged = model.apply({"params": frozen.merge(base, adapters)}, *_inputs())
  np.testing.assert_allclose(unmerged, merged, rtol=1e-4, atol=1e-4)
  # And the adapters matter: without them the logits move by far more than the tolerance.
  assert (
    np.abs(
      np.asarray(unmerged) - model.apply({"params": frozen.merge(base, adapters, unmerged=frozen.layouts)}, *_inputs())
    ).max()
    > 1e-2
  )


def test_dropout_drops_the_adapters_input_only(corpus_file):
  model, frozen, base, adapters = _frozen(corpus_file, (), dropout=0.5)
  variables = frozen.train_variables(base, adapters)
  logits = lambda v, seed: np.asarray(model.apply(v, *_inputs(), rngs={"dropout": jax.random.key(seed)}))  # noqa: E731
  first, again, other = logits(variables, 0), logits(variables, 0), logits(variables, 1)
  np.testing.assert_array_equal(first, again)  # one draw per rng
  assert np.abs(first - other).max() > 1e-3  # another rng, another mask
  # B = 0: whatever the mask drops, the base path sees x whole, so the logits are the base's bit for bit.
  zero_b = jax.tree.map(lambda x: x * 0, variables["lora"])
  base_logits = model.apply({"params": frozen.merge(base, adapters, unmerged=frozen.layouts)}, *_inputs())
  np.testing.assert_array_equal(logits({**variables, "lora": zero_b}, 0), base_logits)
  # Without a 'lora' collection (evaluation, predict: merged params) there is nothing to drop.
  merged = frozen.merge(base, adapters)
  np.testing.assert_array_equal(logits({"params": merged}, 0), logits({"params": merged}, 1))


def test_a_run_with_dropout_trains_and_its_peft_export_says_so(tmp_path, corpus_file, tiny_run):
  wd = str(tmp_path / "run")
  out = run_train(
    wd,
    *tiny_flags(corpus_file),
    f"--config.init_from={tiny_run}",
    "--config.finetune.lora.rank=4",
    "--config.finetune.lora.dropout=0.1",
    "--config.total_steps=3",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  adapters, meta = checkpoint.load_params(os.path.join(wd, "checkpoints"))
  assert meta["config"]["finetune"]["lora"]["dropout"] == 0.1
  b = [w for k, w in traverse_util.flatten_dict(adapters).items() if k[-1] == "lora_b"]
  assert b and all(np.abs(w).max() > 0 for w in b)  # every B has moved off zero
  convert.export_peft(wd, str(tmp_path / "peft"))
  assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["lora_dropout"] == 0.1

"""The one path's two seams (t5jax/seams.py), used as a new feature would use them: a loss term the train step
has never seen, and an input kind registered by one line, trained through `train.run` with no other change."""

import dataclasses
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from t5jax import parallel, seams, setup, train
from t5jax.data import specs
from t5jax.data.tokenizer import Tokenizer
from t5jax.metrics import read_metrics
from t5jax.model import T5


@dataclasses.dataclass(frozen=True)
class LogitPenalty:
  """A loss term: `arg` times the sum over weighted target tokens of the squared mean logit (a toy regularizer),
  its weight a train-step argument."""

  abstract_arg: Any
  sharding: Any
  weight: float

  def add_loss(self, m, logits, batch, arg):
    penalty = jnp.sum(jnp.mean(logits, axis=-1) ** 2 * batch["decoder_loss_weights"])
    return dict(m, loss_sum=m["loss_sum"] + arg * penalty, penalty_sum=penalty)

  def batch_features(self, config, rows):
    return {}

  def data_options(self):
    return {}

  def check_data(self, data):
    pass

  def load_arg(self):
    return np.float32(self.weight)


def test_a_new_loss_term_joins_the_step_through_the_seam(corpus_file):
  config = tiny_config(corpus_file)
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    term = LogitPenalty(jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding), sharding, 0.5)
    plain, penalized = setup.build(config, mesh, ()), setup.build(config, mesh, [term])
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(1, 300, v.shape).astype(v.dtype) for k, v in plain.batch_spec.items()}
    batch = parallel.host_to_global(batch, plain.batch_sharding)
    state = plain.init_state()
    _, m0 = plain.train_step(jax.tree.map(jnp.copy, state), batch)
    _, m1 = penalized.with_term_args(penalized.compile_train_step())(state, batch)
  assert float(m1["penalty_sum"]) > 0
  np.testing.assert_allclose(m1["loss_sum"], m0["loss_sum"] + 0.5 * m1["penalty_sum"], rtol=1e-5)
  assert float(m1["grad_norm"]) != pytest.approx(float(m0["grad_norm"]))  # the term moves the gradient too


@dataclasses.dataclass(frozen=True)
class CopyData:
  """Random id sequences whose target is the sequence itself; batch `step` a pure function of the step."""

  tokenizer: Tokenizer
  train: grain.MapDataset
  eval: grain.MapDataset
  source: str = "random ids to copy"
  skipped: dict = dataclasses.field(default_factory=dict)


def _copy_data(config, cache_dir, shard_index=0, shard_count=1, **options):
  del cache_dir, options
  rows, length = config.batch_size // shard_count, config.data.inputs_length

  def batch(seed, step):
    ids = np.random.default_rng((seed, step, shard_index)).integers(2, 40, (rows, length)).astype(np.int32)
    shifted = np.pad(ids, ((0, 0), (1, 0)))[:, :-1]
    return dict(
      encoder_input_tokens=ids,
      decoder_target_tokens=ids,
      decoder_input_tokens=shifted,
      decoder_loss_weights=np.ones_like(ids),
    )

  steps = grain.MapDataset.range(1 << 30)
  tokenizer = Tokenizer(config.data.tokenizer.path)
  return CopyData(tokenizer, steps.map(lambda s: batch(0, s)), steps.map(lambda s: batch(1, s)))


def test_a_new_input_kind_is_one_registration_line(tiny_run, corpus_file, tmp_path, monkeypatch):
  monkeypatch.setitem(seams.KINDS, "copy", seams.InputKind(specs.text_spec, lambda c, mc: T5(mc), data=_copy_data))
  steps = ["--config.total_steps=30", "--config.log_every=1", "--config.eval_every=30", "--config.checkpoint_every=30"]
  config = tiny_config(corpus_file, *steps, f"--config.data.tokenizer.path={tiny_run}/spiece.model")
  config.data.kind = "copy"
  config.data.targets_length = config.data.inputs_length  # text_spec reads the decoder length here
  config.optimizer.learning_rate = 0.03
  train.run(config, str(tmp_path / "copy"))
  rows = [r for r in read_metrics(str(tmp_path / "copy" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 31))
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]  # it learns to copy
  config.decode_eval_every = 10
  with pytest.raises(ValueError, match="config.data.kind='copy' decodes nothing"):
    train.check_config(config)

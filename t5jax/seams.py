"""The one path's two seams: input kinds (what a run reads) and extra loss terms (what its train step adds).

An input kind gives its batch spec, the model that reads its batches, how `evaluate` decodes it, its own
config checks, and its data (`data/pipeline.py` builds the kinds here). A loss term (`steps.LossTerm`) gives the train step an
extra argument and an extra term of the loss; distillation is one. setup, steps, train, evaluate and
data/specs.py ask these tables and never which kind or term a run has: a new input kind or loss is a room of
its own plus one line here.
"""

import dataclasses
import importlib
from typing import Callable

from t5jax import evaluation
from t5jax.data import denoisers, pipeline, specs, video_dataset
from t5jax.model import T5
from t5jax.model.video import training_model


@dataclasses.dataclass(frozen=True)
class InputKind:
  batch_spec: Callable  # (config, rows) -> {feature: (shape, dtype)}
  model: Callable  # (config, model_config) -> the flax module the train step applies
  evaluate: Callable | None = None  # (model, params, data, config) -> {task: {metric: value}}; None = no decoding
  check: Callable = lambda config: None  # (config) -> None, or a one-line ValueError
  # (config, cache_dir, shard_index, shard_count, **loss terms' options) -> data: .train[step] / .eval[i] are
  # this host's rows of batch step / eval batch i, with .tokenizer, .source and .skipped (see pipeline.py)
  data: Callable = pipeline.from_config


def _text_model(config, model_config):
  del config
  return T5(model_config)


def _evaluate_tasks(model, params, data, config):
  return evaluation.evaluate_tasks(model, params, data, num_examples=config.decode_eval_examples)


def _evaluate_continuations(model, params, data, config):
  return evaluation.evaluate_continuations(
    model,
    params,
    data,
    num_tokens=config.continuation_tokens,
    num_examples=config.decode_eval_examples,
    prompt=config.get("continuation_prompt", "prefix_lm"),  # runs recorded before the field: UL2's own prompt
  )


def _check_denoisers(config):
  denoisers.denoisers_from_config(config.data)


KINDS = {
  "span_corruption": InputKind(specs.text_spec, _text_model),
  "tasks": InputKind(specs.text_spec, _text_model, _evaluate_tasks),
  # UL2's mixture of denoisers, and its prefix LM alone (data/denoisers.py): text batches like span corruption's.
  "ul2": InputKind(specs.text_spec, _text_model, _evaluate_continuations, _check_denoisers),
  "prefix_lm": InputKind(specs.text_spec, _text_model, _evaluate_continuations, _check_denoisers),
  "video": InputKind(
    video_dataset.batch_spec,
    lambda config, model_config: training_model(model_config, config.data.video.augment),
    lambda model, params, data, config: evaluation.evaluate_captions(model, params, data),
    video_dataset.check_config,
  ),
}

# Loss terms: the config group that turns one on -> the module whose `build_term(config, mesh, model_config)`
# returns its steps.LossTerm (or None when the group is off) and whose `check_config(config)` vets the group.
# Modules are named, not imported: a term's module may import train (distill.py's teacher-first CLI does).
LOSS_TERMS = {"distill": "t5jax.distill"}


def kind(config):
  """The InputKind of `config.data.kind`."""
  if config.data.kind not in KINDS:
    raise ValueError(f"config.data.kind={config.data.kind!r} is unknown; choose one of {tuple(KINDS)}")
  return KINDS[config.data.kind]


def check_config(config):
  """The input kind's and every configured loss term's own checks (train.check_config calls this)."""
  kind(config).check(config)
  for group, module in LOSS_TERMS.items():
    if group in config:
      importlib.import_module(module).check_config(config)


def loss_terms(config, mesh, model_config):
  """The steps.LossTerm of every loss term `config` turns on, built for `mesh` (no concrete device array)."""
  terms = []
  for group, module in LOSS_TERMS.items():
    if group in config:
      term = importlib.import_module(module).build_term(config, mesh, model_config)
      terms += [term] if term is not None else []
  return tuple(terms)


def batch_spec(config, rows=None, terms=()):
  """{feature: (shape, dtype)} of a batch of `rows` (default: the global batch): the input kind's features and
  those the loss `terms` read."""
  rows = config.batch_size if rows is None else rows
  spec = kind(config).batch_spec(config, rows)
  for term in terms:
    spec.update(term.batch_features(config, rows))
  return spec

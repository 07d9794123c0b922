"""Task mixtures as batches: registered tasks -> tokenized examples -> padded or packed rows, indexed by step.

`build_task_data(...).train[step]` is this host's share of global batch `step`, a pure function of (tasks,
seed, step, shard), so resuming needs only the step (see `loader.iterate_from`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import grain
import numpy as np

from t5jax.data import packing, tasks as tasks_lib
from t5jax.data.tokenizer import Tokenizer, load_or_train_tokenizer

# A second tokenizer's ids of every example (a distilling teacher's own, t5jax/distill.py) ride in the same rows
# under this prefix, one example per row and padded to the same lengths.
TEACHER_PREFIX = "teacher_"


class Tokenize:
  """grain map: raw record of task `task_index` -> (task_index, inputs ids, targets ids), trimmed so that
  EOS still fits (T5 trims rather than drops long examples). With a `teacher_tokenizer` (distillation
  across tokenizers) the teacher's inputs and targets ids follow: a 5-tuple."""

  def __init__(self, task, task_index, tokenizer, inputs_length, targets_length, teacher_tokenizer=None):
    self.task, self.task_index, self.tokenizer = task, task_index, tokenizer
    self.inputs_length, self.targets_length = inputs_length, targets_length
    self.teacher_tokenizer = teacher_tokenizer

  def _ids(self, tokenizer, ex):
    eos = [tokenizer.eos_id]
    x = tokenizer.encode(ex["inputs"])[: self.inputs_length - 1] + eos
    y = tokenizer.encode(ex["targets"])[: self.targets_length - 1] + eos
    return np.asarray(x, np.int32), np.asarray(y, np.int32)

  def __call__(self, record):
    ex = self.task.preprocess(record)
    teacher = self._ids(self.teacher_tokenizer, ex) if self.teacher_tokenizer else ()
    return (self.task_index, *self._ids(self.tokenizer, ex), *teacher)


class TaskStep:
  """grain map: step -> this shard's rows. Unpacked, a global step takes examples [step*B, (step+1)*B) and
  each host keeps its B/shards of them; packed, each host packs its share of a pool of B * pool_factor
  examples into its B/shards rows (what does not fit is dropped: `benchmarks/loader_throughput.py`
  reports the fill rate)."""

  def __init__(
    self, examples, *, batch_size, inputs_length, targets_length, pack, pool_factor, shard_index, shard_count
  ):
    self.examples, self.pack = examples, pack
    self.inputs_length, self.targets_length = inputs_length, targets_length
    self.rows = batch_size // shard_count
    self.per_step = batch_size * (pool_factor if pack else 1)
    self.per_host = self.per_step // shard_count
    self.shard_index = shard_index

  def __call__(self, step):
    first = step * self.per_step + self.shard_index * self.per_host
    picked = [self.examples[i] for i in range(first, first + self.per_host)]
    pairs = [ex[1:3] for ex in picked]
    if self.pack:
      return packing.pack_examples(pairs, self.rows, self.inputs_length, self.targets_length)[0]
    rows = packing.pad_examples(pairs, self.inputs_length, self.targets_length)
    if len(picked[0]) == 5:  # the teacher's own tokenization, in the same rows, under TEACHER_PREFIX
      teacher = packing.pad_examples([ex[3:] for ex in picked], self.inputs_length, self.targets_length)
      rows.update({TEACHER_PREFIX + k: v for k, v in teacher.items()})
    return rows


@dataclasses.dataclass(frozen=True)
class TaskData:
  tokenizer: Tokenizer
  train: grain.MapDataset
  eval: grain.MapDataset
  tasks: tuple  # the Task objects, in mixture order
  rates: np.ndarray  # their mixing probabilities
  inputs_length: int
  targets_length: int
  eval_sources: tuple  # each task's raw validation records (what evaluate decodes)
  source: str  # the mixture, in words (recorded in the workdir's config.json)
  skipped: dict  # records left out while reading, by kind: {"malformed_lines": n}


def _sample_text(task_sources, per_task=2000):
  """Inputs and targets of the first `per_task` train records of every task: the tokenizer's training text."""
  lines = []
  for task, source in task_sources:
    for i in range(min(per_task, len(source))):
      ex = task.preprocess(source[i])
      lines += [ex["inputs"], ex["targets"]]
  return lines


def mixture_dataset(
  task_list, split_sources, tokenizer, *, rates, seed, shuffle, inputs_length, targets_length, teacher_tokenizer=None
):
  """The mixture as one indexable stream of tokenized examples (grain mix: example i is a deterministic
  function of i; each task's examples are shuffled per epoch and repeated)."""
  parts = []
  for i, (task, source) in enumerate(zip(task_list, split_sources, strict=True)):
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=seed + i)
    parts.append(ds.repeat().map(Tokenize(task, i, tokenizer, inputs_length, targets_length, teacher_tokenizer)))
  return grain.MapDataset.mix(parts, weights=list(rates)) if len(parts) > 1 else parts[0]


def _open_tasks(task_names, data_dir, strict):
  """(tasks, their train sources, their validation sources) for the named tasks."""
  task_list = tuple(tasks_lib.get_task(n) for n in task_names)  # unknown names: an error listing known ones
  if not task_list:
    raise ValueError("config.data.mixture.tasks is empty: name at least one task")
  open_options = dict(data_dir=data_dir, strict=strict)  # TFDS tasks read data_dir; JSONL ones honour strict
  train_sources = [t.source("train", **open_options) for t in task_list]
  return task_list, train_sources, [t.source("validation", **open_options) for t in task_list]


def _task_tokenizer(cache_dir, task_list, train_sources, tokenizer_path, vocab_size_spm, extra_ids):
  """The given tokenizer, or one trained on a sample of the tasks' text (cached by that text's hash)."""
  if tokenizer_path:
    return Tokenizer(tokenizer_path, extra_ids=extra_ids)
  text = _sample_text(list(zip(task_list, train_sources, strict=True)))
  key = hashlib.md5("\n".join(text).encode("utf-8")).hexdigest()[:12]
  path = os.path.join(os.fspath(cache_dir), "tokenizer", f"spm_tasks_v{vocab_size_spm}_{key}.model")
  return load_or_train_tokenizer(path, lambda: text, vocab_size_spm, extra_ids=extra_ids, split_digits=True)


def build_task_data(
  cache_dir,
  *,
  task_names,
  inputs_length,
  targets_length,
  batch_size,
  seed,
  vocab_size_spm=400,
  tokenizer_path=None,
  extra_ids=100,
  mixing_rate="proportional",
  mixing_cap=2**19,
  mixing_temperature=1.0,
  pack=False,
  pool_factor=4,
  shard_index=0,
  shard_count=1,
  data_dir=None,
  strict=False,
  teacher_tokenizer_path=None,
) -> TaskData:
  """Tasks by name -> a tokenizer (given, or trained on their text and cached) and train / eval datasets.
  `teacher_tokenizer_path`: a distilling teacher's own SentencePiece model, whose tokenization rides along."""
  if batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(f"batch_size {batch_size} must split evenly over {shard_count} shards")
  task_list, train_sources, eval_sources = _open_tasks(task_names, data_dir, strict)
  rates = tasks_lib.mixing_rates(
    [tasks_lib.task_size(t, s) for t, s in zip(task_list, train_sources, strict=True)],
    mixing_rate,
    cap=mixing_cap,
    temperature=mixing_temperature,
  )
  tokenizer = _task_tokenizer(cache_dir, task_list, train_sources, tokenizer_path, vocab_size_spm, extra_ids)
  lengths = dict(inputs_length=inputs_length, targets_length=targets_length)
  teacher = Tokenizer(teacher_tokenizer_path, extra_ids=extra_ids) if teacher_tokenizer_path else None
  step_kw = dict(
    batch_size=batch_size,
    pack=pack,
    pool_factor=pool_factor,
    shard_index=shard_index,
    shard_count=shard_count,
    **lengths,
  )
  mix = functools.partial(mixture_dataset, task_list, tokenizer=tokenizer, teacher_tokenizer=teacher, **lengths)
  train = mix(train_sources, rates=rates, seed=seed, shuffle=True)
  evals = mix(eval_sources, rates=np.ones(len(task_list)), seed=0, shuffle=False)  # in order, mixed equally
  return TaskData(
    tokenizer=tokenizer,
    tasks=task_list,
    rates=rates,
    eval_sources=tuple(eval_sources),
    **lengths,
    train=grain.MapDataset.range(2**62).map(TaskStep(train, **step_kw)),
    eval=grain.MapDataset.range(2**62).map(TaskStep(evals, **step_kw)),
    source="tasks " + ", ".join(t.name for t in task_list),
    # JSONL sources count the lines they could not parse; other sources skip nothing.
    skipped={"malformed_lines": sum(getattr(s, "num_malformed", 0) for s in train_sources + eval_sources)},
  )

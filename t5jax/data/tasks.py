"""The task registry: named text-to-text tasks (a source, T5's prefix, preprocessors, metrics) and mixtures.

A task turns raw records of its source into `{"inputs": str, "targets": str}` with T5's text prefixes
("translate English to German: ", "summarize: ", "cola sentence: ", "stsb sentence1: ... sentence2: ").
Tokenizing, trimming, packing and batching are the pipeline's job (`pipeline.py`), shared by every task.
Synthetic tasks (copy, reverse, sort, add) are generated on the fly from (seed, index): no files at all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from t5jax.data import sources

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """A named text-to-text task.

  source: (split name, *, data_dir, strict) -> a random-access source of raw records. Called lazily, so
    registering a TFDS task costs nothing until it is used; `data_dir` (where TFDS datasets are prepared)
    and `strict` (malformed JSONL lines are errors) come from the run's config, and a source ignores what
    it does not read.
  preprocessors: applied in order to each raw record; the last one yields {"inputs", "targets"} strings.
  metrics: names from `evaluate.METRICS`, computed on decoded text.
  postprocess: decoded target text -> the value metrics compare (stsb: a float); identity by default.
  num_examples: the train size used by examples-proportional mixing when the source is infinite.
  """

  name: str
  source: Callable[[str], Any]
  preprocessors: tuple[Callable[[Record], Record], ...]
  metrics: tuple[str, ...] = ("exact_match",)
  postprocess: Callable[[str], Any] | None = None
  num_examples: int | None = None

  def preprocess(self, record: Record) -> Record:
    for fn in self.preprocessors:
      record = fn(record)
    return record


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
  _TASKS[task.name] = task
  return task


def get_task(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
  return _TASKS[name]


def task_names() -> list[str]:
  return sorted(_TASKS)


# ---------------------------------------------------------------------------------------------------------
# Mixing rates (T5 paper, section 3.5.2).


def mixing_rates(
  sizes: Sequence[int], rate: str = "proportional", *, cap: int = 2**19, temperature: float = 1.0
) -> np.ndarray:
  """Probabilities of drawing from each task: "equal"; "proportional" to min(size, cap) (the cap keeps a
  huge task from drowning the small ones); "temperature": min(size, cap) ** (1 / T), T=1 proportional,
  T -> inf equal."""
  sizes = np.asarray(sizes, dtype=np.float64)
  if rate == "equal":
    weights = np.ones_like(sizes)
  elif rate == "proportional":
    weights = np.minimum(sizes, cap)
  elif rate == "temperature":
    if temperature <= 0:
      raise ValueError(f"mixing temperature must be positive, got {temperature}")
    weights = np.minimum(sizes, cap) ** (1.0 / temperature)
  else:
    raise ValueError(f"unknown mixing rate {rate!r}; choose equal, proportional or temperature")
  if not (weights > 0).all():
    raise ValueError(f"every task needs a positive rate, got sizes {sizes.tolist()}")
  return weights / weights.sum()


def task_size(task: Task, source) -> int:
  return task.num_examples if task.num_examples is not None else len(source)


# ---------------------------------------------------------------------------------------------------------
# Preprocessors: picklable callables (grain sends them into worker processes), so partials, not lambdas.


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rekey(record, *, inputs, targets, prefix=""):
  return {"inputs": prefix + _text(record[inputs]), "targets": _text(record[targets])}


def rekey(inputs: str, targets: str, prefix: str = ""):
  """Record fields `inputs` and `targets` -> {"inputs": prefix + inputs, "targets": targets}."""
  return functools.partial(_rekey, inputs=inputs, targets=targets, prefix=prefix)


def _translate(record, *, source_language, target_language, source_key, target_key):
  return {
    "inputs": f"translate {source_language} to {target_language}: {_text(record[source_key])}",
    "targets": _text(record[target_key]),
  }


def translate(source_language="English", target_language="German", source_key="en", target_key="de"):
  return functools.partial(
    _translate,
    source_language=source_language,
    target_language=target_language,
    source_key=source_key,
    target_key=target_key,
  )


def summarize(article_key="article", summary_key="highlights"):
  return rekey(article_key, summary_key, prefix="summarize: ")


def cola(record):
  """GLUE CoLA as T5 casts it: the label as a word."""
  label = "acceptable" if int(record["label"]) == 1 else "unacceptable"
  return {"inputs": f"cola sentence: {_text(record['sentence'])}", "targets": label}


def stsb_target(score: float) -> str:
  """T5's STS-B regression as text: the 0..5 score rounded to the nearest 0.2, one decimal ("3.4")."""
  return f"{round(float(score) * 5) / 5:.1f}"


def stsb(record):
  return {
    "inputs": f"stsb sentence1: {_text(record['sentence1'])} sentence2: {_text(record['sentence2'])}",
    "targets": stsb_target(record["label"]),
  }


def stsb_postprocess(text: str) -> float:
  """Decoded text -> float; an unparsable prediction counts as 0.0 (as T5's string_to_float does)."""
  try:
    return float(text)
  except ValueError:
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# Sources for registered tasks.


def _tfds(name, split, *, own_data_dir, splits, data_dir=None, strict=False):
  del strict
  return sources.tfds_source(name, (splits or {}).get(split, split), own_data_dir or data_dir)


def tfds_task(name, tfds_name, preprocessors, metrics, *, data_dir=None, splits=None, postprocess=None):
  """A task over a prepared TFDS dataset (see `sources.tfds_source`), read from `data_dir` if given here,
  else from the run's `config.data.source.data_dir`."""
  return Task(
    name,
    functools.partial(_tfds, tfds_name, own_data_dir=data_dir, splits=splits),
    tuple(preprocessors),
    tuple(metrics),
    postprocess,
  )


def _jsonl(split, *, paths, data_dir=None, strict=False):
  del data_dir
  return sources.JsonlSource(paths[split], strict=strict)


def jsonl_task(
  name, train_path, validation_path, *, inputs="inputs", targets="targets", prefix="", metrics=("exact_match",)
):
  """A task over the user's JSONL files (paths or globs), one JSON object per line."""
  paths = {"train": train_path, "validation": validation_path}
  return Task(name, functools.partial(_jsonl, paths=paths), (rekey(inputs, targets, prefix),), tuple(metrics))


# T5's GLUE / WMT / CNN-DM tasks with their prefixes; they read TFDS and so need --config.data.source.data_dir.
# (GLUE's test labels are hidden, so T5 evaluates on validation.)
for _name, _tfds_name, _pre, _metrics, _post in (
  ("glue_cola", "glue/cola", (cola,), ("accuracy",), None),
  ("glue_stsb", "glue/stsb", (stsb,), ("pearson", "spearman"), stsb_postprocess),
  ("wmt_t2t_ende", "wmt_t2t_translate/de-en", (translate(),), ("bleu",), None),
  ("cnn_dailymail", "cnn_dailymail", (summarize(),), ("rouge",), None),
):
  register(tfds_task(_name, _tfds_name, _pre, _metrics, postprocess=_post))


# ---------------------------------------------------------------------------------------------------------
# Synthetic tasks: record i of a split is a pure function of (task, split, i), so they are infinite,
# need no storage, and train never sees the validation examples' seeds.

WORDS = (
  "apple bird cat dog egg fish goat hat ice jam kite lamp moon nest owl pig queen rose sun tree "
  "umbrella van whale fox yak zebra"
).split()
_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}


class SyntheticSource:
  """`[i]` is `make(rng)` with rng seeded by (task salt, split, i); a nominal length of 2**31."""

  def __init__(self, make, salt: int, split: str):
    if split not in _SPLIT_SALT:
      raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_SALT)}, got {split!r}")
    self.make, self.seed = make, (salt, _SPLIT_SALT[split])

  def __len__(self):
    return 2**31

  def __getitem__(self, i):
    return self.make(np.random.default_rng([*self.seed, int(i)]))


def _words(rng, low=3, high=8):
  return [WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(low, high + 1)))]


def _copy(rng):
  w = _words(rng)
  return {"inputs": " ".join(w), "targets": " ".join(w)}


def _reverse(rng):
  w = _words(rng)
  return {"inputs": " ".join(w), "targets": " ".join(reversed(w))}


def _sort(rng):
  n = rng.integers(0, 100, int(rng.integers(3, 7)))
  return {"inputs": " ".join(map(str, n)), "targets": " ".join(map(str, sorted(n)))}


def _add(rng):
  a, b = (int(x) for x in rng.integers(0, 100, 2))
  return {"inputs": f"{a} + {b}", "targets": str(a + b)}


def _synthetic_source(split, *, make, salt, data_dir=None, strict=False):
  del data_dir, strict
  return SyntheticSource(make, salt, split)


for _salt, (_name, _make) in enumerate((("copy", _copy), ("reverse", _reverse), ("sort", _sort), ("add", _add))):
  register(
    Task(
      f"synthetic_{_name}",
      functools.partial(_synthetic_source, make=_make, salt=_salt + 1),
      (rekey("inputs", "targets", prefix=f"{_name}: "),),
      ("exact_match",),
      num_examples=100_000,
    )
  )

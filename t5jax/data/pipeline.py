"""The dataset factory: `from_config` builds the run's data from `config.data`.

span_corruption -> `pretraining.PretrainingData` (embedded corpus, text files or TFDS);
ul2, prefix_lm  -> the same, of UL2's mixture of denoisers or its prefix LM alone (`denoisers.py`);
tasks           -> `mixtures.TaskData` (registered tasks, plus the user's JSONL files as the task "jsonl");
video           -> `video_dataset.VideoData` (a folder of videos + captions, or synthetic videos).
Either way `data.train[step]` is this host's share of global batch `step`,
and `data.source` / `data.skipped` say what was read and what was left out. Shapes: `seams.batch_spec`.
"""

from absl import logging

from t5jax import storage
from t5jax.data import denoisers, mixtures, pretraining, tasks as tasks_lib, video_dataset

KINDS = ("span_corruption", "tasks", "video", "ul2", "prefix_lm")


def from_config(config, cache_dir, shard_index=0, shard_count=1, teacher_tokenizer=None):
  """The run's data as `config.data.kind` says; this host is shard `shard_index` of `shard_count`.
  `teacher_tokenizer`: a second SentencePiece model whose ids of each task example ride along
  (`mixtures.TEACHER_PREFIX`), as a loss term asks (`RunSetup.data_options`)."""
  d = config.data
  if d.kind not in KINDS:
    raise ValueError(f"config.data.kind={d.kind!r} is unknown; choose one of {KINDS}")
  common = dict(
    batch_size=config.batch_size,
    seed=config.seed,
    vocab_size_spm=d.tokenizer.spm_vocab_size,
    tokenizer_path=_local(d.tokenizer.path, cache_dir),
    shard_index=shard_index,
    shard_count=shard_count,
  )
  if d.kind == "span_corruption":
    return pretraining.build_pretraining_data(
      cache_dir,
      inputs_length=d.inputs_length,
      noise_density=d.corruption.noise_density,
      mean_noise_span_length=d.corruption.mean_noise_span_length,
      **_text_source(d.source),
      **common,
    )
  if d.kind in ("ul2", "prefix_lm"):
    return denoisers.build_ul2_data(d, cache_dir, **_text_source(d.source), **common)
  if d.kind == "video":
    return video_dataset.build_video_data(d.video, cache_dir, targets_length=d.targets_length, **common)
  task_names = list(d.mixture.tasks)
  if d.jsonl.train:  # the user's own files, as the task "jsonl"
    if not d.jsonl.validation:
      raise ValueError("config.data.jsonl.train is set but config.data.jsonl.validation is not")
    tasks_lib.register(
      tasks_lib.jsonl_task(
        "jsonl",
        d.jsonl.train,
        d.jsonl.validation,
        inputs=d.jsonl.inputs,
        targets=d.jsonl.targets,
        prefix=d.jsonl.prefix,
      )
    )
    task_names = task_names or ["jsonl"]
  return mixtures.build_task_data(
    cache_dir,
    task_names=task_names,
    inputs_length=d.inputs_length,
    targets_length=d.targets_length,
    mixing_rate=d.mixture.rate,
    mixing_cap=d.mixture.cap,
    mixing_temperature=d.mixture.temperature,
    pack=d.packing.enabled,
    pool_factor=d.packing.pool_factor,
    data_dir=d.source.data_dir,
    strict=d.strict,
    teacher_tokenizer_path=_local(teacher_tokenizer, cache_dir),
    **common,
  )


def _local(path, cache_dir):
  """A tokenizer file (SentencePiece reads local files only): as it is, or a gs:// one copied into the cache."""
  return storage.local_copy(path, cache_dir) if path else None


def _text_source(src):
  """The pretraining text options of `config.data.source` (pretraining.token_chunks)."""
  tfds_name = src.tfds_name
  if tfds_name and not src.data_dir:
    # Configs name a dataset; a data_dir says it is prepared somewhere. Without one, say what is read.
    logging.warning(
      "config.data.source.tfds_name=%s but no config.data.source.data_dir: training on the embedded corpus instead",
      tfds_name,
    )
    tfds_name = None
  return dict(
    text_glob=src.text_glob,
    tfds_name=tfds_name,
    data_dir=src.data_dir,
    max_documents=src.max_documents,
    eval_percent=src.get("eval_percent", 2),
  )

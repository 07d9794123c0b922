"""TFDS without TensorFlow: a real builder writes ArrayRecord files locally, `tfds.data_source` reads them."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from t5jax.data import pipeline, pretraining, sources, tasks  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
  """A C4-like dataset ({"text": ...}) built from a generator: no download, no TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files beside a packaged builder.
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "label": np.float32})
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(400, 0), "validation": self._generate_examples(40, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, {"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 60)))), "label": float(i % 5)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  TinyCorpus(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def test_data_source_reads_the_prepared_dataset(data_dir):
  src = sources.tfds_source("tiny_corpus", "train", data_dir)
  assert len(src) == 400
  record = src[17]
  assert set(record) == {"text", "label"} and isinstance(record["text"], bytes)
  assert len(sources.tfds_source("tiny_corpus", "validation", data_dir)) == 40


def test_span_corruption_from_tfds(data_dir, tmp_path):
  data = pretraining.build_pretraining_data(
    tmp_path, inputs_length=32, batch_size=4, seed=0, vocab_size_spm=300, tfds_name="tiny_corpus", data_dir=data_dir
  )
  text = data.tokenizer.decode(data.train[0]["encoder_input_tokens"][0])
  assert "<extra_id_0>" in text and any(w in text for w in WORDS)


def test_a_tfds_task_in_a_mixture_reads_the_configs_data_dir(data_dir, tmp_path):
  from configs import base

  # Registered without a data_dir, as T5's GLUE / WMT tasks are: the run's config.data.source.data_dir says where.
  tasks.register(
    tasks.tfds_task("tiny_stsb_like", "tiny_corpus", [tasks.rekey("text", "label", "echo: ")], ["exact_match"])
  )
  config = base.get_config()
  config.batch_size, config.data.kind, config.data.source.data_dir = 4, "tasks", data_dir
  config.data.mixture.tasks, config.data.inputs_length, config.data.targets_length = (
    ("tiny_stsb_like", "synthetic_add"),
    48,
    8,
  )
  config.data.tokenizer.spm_vocab_size = 400
  data = pipeline.from_config(config, tmp_path)
  # Examples-proportional: 400 records against synthetic_add's nominal 100,000.
  np.testing.assert_allclose(data.rates, [400 / 100_400, 100_000 / 100_400])
  assert data.train[0]["encoder_input_tokens"].shape == (4, 48)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  for name in ("c4/en", "tiny_corpus"):
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build .*--file_format=array_record"):
      sources.tfds_source(name, "train", str(tmp_path))

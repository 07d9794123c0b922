"""The task registry: T5's prefixes, mixing rates, synthetic tasks, JSONL sources and their errors."""

import json

import numpy as np
import pytest

from t5jax.data import mixtures, sources, tasks


def test_t5_prefixes():
  assert tasks.translate()({"en": "Hello.", "de": "Hallo."}) == {
    "inputs": "translate English to German: Hello.",
    "targets": "Hallo.",
  }
  assert tasks.summarize()({"article": b"Long text.", "highlights": b"Short."}) == {
    "inputs": "summarize: Long text.",
    "targets": "Short.",
  }
  assert tasks.cola({"sentence": "The cat sat.", "label": 1}) == {
    "inputs": "cola sentence: The cat sat.",
    "targets": "acceptable",
  }
  assert tasks.cola({"sentence": "Cat the sat.", "label": 0})["targets"] == "unacceptable"
  ex = tasks.stsb({"sentence1": "A man plays.", "sentence2": "A man is playing.", "label": 3.47})
  assert ex == {"inputs": "stsb sentence1: A man plays. sentence2: A man is playing.", "targets": "3.4"}
  # Rounded to the nearest 0.2, as T5 casts STS-B regression as 26 classes.
  assert [tasks.stsb_target(x) for x in (0.0, 0.09, 0.11, 2.5, 4.99, 5.0)] == ["0.0", "0.0", "0.2", "2.4", "5.0", "5.0"]
  assert tasks.stsb_postprocess("3.8") == 3.8 and tasks.stsb_postprocess("cat") == 0.0
  for name in ("glue_cola", "glue_stsb", "wmt_t2t_ende", "cnn_dailymail"):
    assert name in tasks.task_names()


def test_mixing_rates():
  sizes = [1_000_000, 10_000, 100]
  np.testing.assert_allclose(tasks.mixing_rates(sizes, "equal"), [1 / 3] * 3)
  np.testing.assert_allclose(
    tasks.mixing_rates(sizes, "proportional", cap=20_000), np.array([20_000, 10_000, 100]) / 30_100
  )
  t2 = tasks.mixing_rates(sizes, "temperature", cap=20_000, temperature=2.0)
  np.testing.assert_allclose(t2, np.sqrt([20_000, 10_000, 100]) / np.sqrt([20_000, 10_000, 100]).sum())
  # Higher temperature moves the rates toward equal.
  assert tasks.mixing_rates(sizes, "temperature", temperature=100.0).std() < t2.std()
  with pytest.raises(ValueError, match="equal, proportional or temperature"):
    tasks.mixing_rates(sizes, "bogus")


def test_unknown_task_lists_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown task 'nope'.*synthetic_add.*synthetic_reverse"):
    tasks.get_task("nope")
  with pytest.raises(ValueError, match="known tasks"):
    mixtures.build_task_data(tmp_path, task_names=["nope"], inputs_length=16, targets_length=8, batch_size=2, seed=0)


def test_synthetic_tasks_are_deterministic_and_correct():
  for name in ("copy", "reverse", "sort", "add"):
    task = tasks.get_task(f"synthetic_{name}")
    train, val = task.source("train"), task.source("validation")
    assert task.preprocess(train[7]) == task.preprocess(task.source("train")[7])
    assert train[7] != val[7]  # splits draw from different seeds
    ex = task.preprocess(train[3])
    assert ex["inputs"].startswith(f"{name}: ")
    body = ex["inputs"][len(name) + 2 :]
    if name == "copy":
      expected = body
    elif name == "reverse":
      expected = " ".join(body.split()[::-1])
    elif name == "sort":
      expected = " ".join(map(str, sorted(map(int, body.split()))))
    else:
      expected = str(sum(int(x) for x in body.split(" + ")))
    assert ex["targets"] == expected


def _write_jsonl(path, rows, bad=()):
  with open(path, "w") as f:
    for i, row in enumerate(rows):
      f.write(json.dumps(row) + "\n")
      if i in bad:
        f.write("{not json\n")


def test_jsonl_source_skips_and_counts_malformed_lines(tmp_path):
  rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
  _write_jsonl(tmp_path / "a.jsonl", rows[:10], bad={2, 5})
  _write_jsonl(tmp_path / "b.jsonl", rows[10:])
  with open(tmp_path / "b.jsonl", "a") as f:
    f.write("[1, 2]\n\n")  # valid JSON but not an object; and a blank line (ignored)
  src = sources.JsonlSource(str(tmp_path / "*.jsonl"))
  assert len(src) == 20 and src.num_malformed == 3 and src[12] == rows[12]
  with pytest.raises(ValueError, match="a.jsonl:4: malformed"):
    sources.JsonlSource(str(tmp_path / "*.jsonl"), strict=True)
  with pytest.raises(FileNotFoundError, match="nothing-\\*.jsonl"):
    sources.JsonlSource(str(tmp_path / "nothing-*.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="empty.jsonl"):
    sources.JsonlSource(str(tmp_path / "empty.jsonl"))


def test_jsonl_task_through_the_pipeline(tmp_path):
  rows = [{"q": f"what is {i} plus one", "a": str(i + 1)} for i in range(50)]
  _write_jsonl(tmp_path / "train.jsonl", rows, bad={0})
  _write_jsonl(tmp_path / "val.jsonl", rows[:5])
  tasks.register(
    tasks.jsonl_task(
      "test_qa",
      str(tmp_path / "train.jsonl"),
      str(tmp_path / "val.jsonl"),
      inputs="q",
      targets="a",
      prefix="question: ",
    )
  )
  data = mixtures.build_task_data(
    tmp_path / "cache",
    task_names=["test_qa", "synthetic_copy"],
    inputs_length=24,
    targets_length=8,
    batch_size=4,
    seed=0,
    mixing_rate="equal",
  )
  assert data.skipped == {"malformed_lines": 1}
  texts = [data.tokenizer.decode(r) for s in range(3) for r in data.train[s]["encoder_input_tokens"]]
  assert any(t.startswith("question: what is") for t in texts) and any(t.startswith("copy: ") for t in texts)

"""End-to-end tests of `python -m t5jax.predict`: a freshly trained workdir, an imported HF dir, bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import NEEDS_TORCH, ROOT, predict_in_process, run_train, tiny_flags

pytestmark = pytest.mark.needs_torch
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
transformers = pytest.importorskip("transformers", reason=NEEDS_TORCH)


def predict(*flags, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "t5jax.predict", *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus_file):
  wd = str(tmp_path_factory.mktemp("trained"))
  out = run_train(
    wd,
    *tiny_flags(corpus_file),
    "--config.total_steps=4",
    "--config.log_every=2",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
    "--config.optimizer.warmup_steps=2",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return wd


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, workdir):
  """A random transformers T5 saved with the workdir's sentencepiece model as its spiece.model."""
  import glob
  import shutil

  directory = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  cfg = transformers.T5Config(
    vocab_size=512,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  )
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(directory)
  shutil.copy(glob.glob(os.path.join(workdir, "cache", "tokenizer", "*.model"))[0], directory / "spiece.model")
  return str(directory)


def test_trained_workdir_txt_file_with_empty_and_long_lines(workdir, tmp_path):
  lines = ["the model learns tokens", "", "a decoder reads the encoder states " * 40, "attention heads"]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  out = predict(
    f"--checkpoint={workdir}",
    f"--input_file={tmp_path / 'in.txt'}",
    f"--output_file={tmp_path / 'out.txt'}",
    "--max_new_tokens=8",
    "--max_input_length=64",
    "--batch_size=2",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = (tmp_path / "out.txt").read_text().split("\n")
  assert len(got) == len(lines) + 1 and got[-1] == ""  # one line per input
  assert got[1] == ""  # empty input -> empty output
  assert "truncated to --max_input_length=64" in out.stderr and "input 3 has" in out.stderr
  assert "predict" in out.stderr  # the progress bar


def test_streaming_prints_the_same_text(hf_dir):
  text = "--input=a model learns tokens from text"
  # Sampling, so that the random model writes text rather than stopping at once; the seed fixes the draws.
  flags = [f"--checkpoint={hf_dir}", text, "--max_new_tokens=12", "--strategy=sample", "--seed=3"]
  plain, streamed = predict(*flags), predict(*flags, "--stream")
  assert plain.returncode == streamed.returncode == 0, streamed.stderr[-3000:]
  assert len(plain.stdout.strip()) > 0 and streamed.stdout == plain.stdout
  bad = predict(f"--checkpoint={hf_dir}", text, "--stream", "--strategy=beam", "--num_beams=2")
  assert bad.returncode == 1 and "--stream" in bad.stderr.strip().splitlines()[-1] and "Traceback" not in bad.stderr


def test_strict_rejects_long_input(workdir):
  out = predict(f"--checkpoint={workdir}", "--input=" + "words " * 100, "--max_input_length=16", "--strict")
  assert out.returncode == 1 and "more than --max_input_length=16" in out.stderr and "Traceback" not in out.stderr


def test_hf_dir_jsonl_with_beams(hf_dir, tmp_path):
  records = [{"input": "the model learns", "id": 7}, {"input": "spans of words are masked", "id": 8}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = predict(
    f"--checkpoint={hf_dir}",
    f"--input_file={tmp_path / 'in.jsonl'}",
    "--strategy=beam",
    "--num_beams=3",
    "--num_return_sequences=2",
    "--max_new_tokens=6",
    f"--output_file={tmp_path / 'out.jsonl'}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["id"] for r in got] == [7, 8] and all(len(r["prediction"]) == 2 for r in got)
  # Sampling on the command line, to stdout.
  out = predict(f"--checkpoint={hf_dir}", "--input=the model", "--strategy=sample", "--top_k=5", "--max_new_tokens=4")
  assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr[-3000:]


@pytest.mark.parametrize(
  "flag_values,message",
  [
    (dict(checkpoint="/nonexistent/ckpt", input="hi"), "/nonexistent/ckpt"),
    (dict(checkpoint="/nonexistent/ckpt", input="hi", strategy="sample", num_beams=4), "beam search with sampling"),
    (dict(checkpoint="/nonexistent/ckpt", input_file="/nonexistent/in.txt"), "/nonexistent/in.txt"),
  ],
)
def test_bad_invocations_are_one_line_errors(flag_values, message):
  from t5jax.predict import PredictError

  with pytest.raises(PredictError, match=message) as e:
    predict_in_process(**flag_values)
  assert "\n" not in str(e.value)


def test_bad_invocation_through_the_cli_exits_1_with_one_line():
  out = predict("--checkpoint=/nonexistent/ckpt", "--input=hi")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("t5jax.predict: error: ") and "/nonexistent/ckpt" in lines[0]


def test_unreadable_checkpoint_names_the_path(tmp_path):
  from t5jax.predict import PredictError

  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(PredictError, match=str(tmp_path)):
    predict_in_process(checkpoint=str(tmp_path), input="hi")


def test_a_workdir_decodes_with_exactly_the_tokenizer_it_recorded(workdir, tmp_path):
  import shutil
  from t5jax.workdir import record as workdir_lib
  from t5jax.predict import PredictError

  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("cache"))  # no cache: the record is enough
  assert workdir_lib.load_run_tokenizer(str(copy)).encode("the model") == workdir_lib.load_run_tokenizer(
    workdir
  ).encode("the model")
  (copy / "spiece.model").write_bytes((copy / "spiece.model").read_bytes()[:-10] + b"0123456789")
  with pytest.raises(PredictError, match="spiece.model differs from the tokenizer this run trained with"):
    predict_in_process(checkpoint=str(copy), input="hi")
  os.remove(copy / "spiece.model")
  with pytest.raises(PredictError, match="spiece.model: the tokenizer this run trained with is missing"):
    predict_in_process(checkpoint=str(copy), input="hi")


def test_a_corrupt_step_is_named_with_the_way_out(workdir, tmp_path):
  import shutil
  from t5jax.predict import PredictError

  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("cache"))
  shutil.rmtree(copy / "checkpoints" / "4" / "state")
  with pytest.raises(PredictError, match=r"checkpoint step 4 is unreadable .*pick another with --checkpoint_step"):
    predict_in_process(checkpoint=str(copy), input="hi")
  with pytest.raises(PredictError, match=r"no checkpoint step 3 \(steps here: \[4\]\)"):
    predict_in_process(checkpoint=str(copy), input="hi", checkpoint_step=3)


def test_non_utf8_input_is_named(workdir, tmp_path):
  from t5jax.predict import PredictError

  (tmp_path / "in.txt").write_bytes(b"fine\nbad \xff\n")
  with pytest.raises(PredictError, match=r"in.txt: not UTF-8 text \(byte 9"):
    predict_in_process(checkpoint=workdir, input_file=str(tmp_path / "in.txt"))
  with pytest.raises(PredictError, match=r"--input is not UTF-8 text \(byte 4\)"):
    predict_in_process(checkpoint=workdir, input="bad \udcff")

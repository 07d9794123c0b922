"""Every CLI's failures are one line: bad config files, workdirs and text; --help exits 0. (Bad --config.*
overrides go through the real train CLI: tests/test_train.py.)"""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from t5jax import cli

ROOT_CONFIG = "configs/base.py"


def _parse(tmp_path, *args):
  """cli.parse_flags over fresh flags (a --config like train's), returning the exit and its stderr."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags("t5jax.train", ["prog", *args], flag_values=fv)
    raise SystemExit(0)
  return e.value.code


@pytest.mark.parametrize(
  "args,words",
  [
    (["--config=configs/nope.py"], ["--config=configs/nope.py: no such config file"]),
    (["--config=configs/base.py:t5.2-huge"], ["unknown model preset 't5.2-huge'"]),
  ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, args, words):
  assert _parse(tmp_path, *args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("t5jax.train: error: ")
  assert all(w in err for w in words), err


def test_a_config_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  assert _parse(tmp_path, f"--config={bad}") == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"{bad}:3: invalid syntax" in err


def test_help_exits_0(tmp_path, capsys):
  assert _parse(tmp_path, "--help") == 0
  assert "--config" in capsys.readouterr().out


def test_leftover_words_and_a_missing_required_flag_are_usage_errors():
  from absl import app

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  fv(["prog"])
  with pytest.raises(app.UsageError, match="^unexpected arguments: extra words$"):
    cli.check_args(["prog", "extra", "words"], "workdir", flag_values=fv)
  with pytest.raises(app.UsageError, match="^--workdir is required$"):
    cli.check_args(["prog"], "workdir", flag_values=fv)
  fv(["prog", "--workdir=/tmp/run"])
  cli.check_args(["prog"], "workdir", flag_values=fv)


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  from t5jax import train

  (tmp_path / "f").write_text("")
  with pytest.raises(ValueError, match=r"--workdir=.*/f is a file, not a directory"):
    train.prepare_workdir(str(tmp_path / "f"))


def test_non_utf8_text_names_the_file_and_byte(tmp_path):
  from t5jax.data import sources

  (tmp_path / "c.txt").write_bytes("fine words\nbad \xe9 byte\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"c.txt: not UTF-8 text at byte 15"):
    sources.read_text_documents(str(tmp_path / "c.txt"))


def test_a_workdir_without_checkpoints_says_so(tmp_path):
  import json
  import t5jax

  (tmp_path / "config.json").write_text(json.dumps({"config": {}, "git": "x"}))
  with pytest.raises(FileNotFoundError, match="a t5jax workdir with no checkpoints yet"):
    t5jax.load_checkpoint(str(tmp_path))


def test_one_line_names_a_unicode_error():
  e = UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte")
  assert cli.one_line(e) == "not UTF-8 text (byte 2: b'\\xff')"


def test_a_config_importing_its_siblings_loads_from_any_working_directory(tmp_path):
  """configs/multitask.py does `from configs import base`: it loads with the cwd outside the checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "t5jax.train",
      f"--config={root}/configs/multitask.py",
      f"--workdir={tmp_path / 'run'}",
      "--config.total_steps=0",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.stderr.strip().splitlines() == ["t5jax.train: error: config.total_steps=0 must be positive"]

"""Task mixtures end to end: packing features, packed == unpacked losses, loader workers, exact resume with
workers after SIGKILL, and the evaluate CLI on the result."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, TINY_MODEL, start_until_step
from t5jax.data import loader, mixtures, packing
from t5jax.metrics import read_metrics
from t5jax.model import T5

TASKS = ["synthetic_copy", "synthetic_reverse", "synthetic_sort", "synthetic_add"]
TINY = [*TINY_MODEL, "--config.eval_steps=1", "--config.decode_eval_examples=8"]


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (
      np.append(rng.integers(3, 90, int(rng.integers(2, 12))), 1).astype(np.int32),
      np.append(rng.integers(3, 90, int(rng.integers(1, 7))), 1).astype(np.int32),
    )
    for _ in range(n)
  ]


def test_packing_features():
  examples = _examples(40)
  packed, dropped = packing.pack_examples(examples, rows=6, inputs_length=32, targets_length=16)
  padded = packing.pad_examples(examples, 32, 16)
  assert dropped > 0 and packed["encoder_input_tokens"].shape == (6, 32)
  seen = 0
  for row in range(6):
    seg_e, seg_d = packed["encoder_segment_ids"][row], packed["decoder_segment_ids"][row]
    k = seg_e.max()
    assert seg_d.max() == k and (np.diff(seg_e[seg_e > 0]) >= 0).all()
    np.testing.assert_array_equal(seg_e > 0, packed["encoder_input_tokens"][row] > 0)
    for s in range(1, k + 1):
      x = packed["encoder_input_tokens"][row][seg_e == s]
      y = packed["decoder_target_tokens"][row][seg_d == s]
      np.testing.assert_array_equal(packed["encoder_positions"][row][seg_e == s], np.arange(len(x)))
      np.testing.assert_array_equal(packed["decoder_positions"][row][seg_d == s], np.arange(len(y)))
      dec_in = packed["decoder_input_tokens"][row][seg_d == s]
      np.testing.assert_array_equal(dec_in, np.concatenate([[0], y[:-1]]))  # restarts at every example
      assert x[-1] == 1 and y[-1] == 1
      seen += 1
  assert seen + dropped == 40
  assert packed["decoder_loss_weights"].sum() + dropped > 0
  assert (packed["encoder_input_tokens"] > 0).mean() > 2 * (padded["encoder_input_tokens"][:6] > 0).mean()


def test_packed_and_unpacked_per_example_losses_match():
  import jax
  import optax
  from t5jax.model import T5Config, get_preset, init_params

  config = T5Config.from_dict(dict(get_preset("t5.1.1-tiny"), vocab_size=128, dropout_rate=0.0))
  model = T5(config)
  params = init_params(config, jax.random.PRNGKey(0))
  examples = _examples(12, seed=1)
  packed, dropped = packing.pack_examples(examples, rows=4, inputs_length=48, targets_length=24)
  assert dropped == 0 and packed["encoder_segment_ids"].max() >= 2
  padded = packing.pad_examples(examples, 48, 24)

  def token_losses(batch):
    args, kwargs = model.batch_inputs(batch)
    logits = model.apply({"params": params}, *args, **kwargs)
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"]))

  lp, lu = token_losses(packed), token_losses(padded)
  per_packed = [
    lp[r][packed["decoder_segment_ids"][r] == s].sum()
    for r in range(4)
    for s in range(1, packed["decoder_segment_ids"][r].max() + 1)
  ]
  per_padded = [lu[i][padded["decoder_loss_weights"][i] > 0].sum() for i in range(12)]
  # First-fit keeps example order within a row; match examples by their target tokens.
  order = []
  for r in range(4):
    for s in range(1, packed["decoder_segment_ids"][r].max() + 1):
      y = packed["decoder_target_tokens"][r][packed["decoder_segment_ids"][r] == s]
      order.append(next(i for i, (_, t) in enumerate(examples) if np.array_equal(t, y) and i not in order))
  np.testing.assert_allclose(per_packed, [per_padded[i] for i in order], atol=1e-5, rtol=1e-5)


def test_workers_yield_exactly_the_indexed_batches(tmp_path):
  data = mixtures.build_task_data(
    tmp_path, task_names=TASKS, inputs_length=32, targets_length=16, batch_size=8, seed=3, pack=True
  )
  it = loader.iterate_from(data.train, 5, num_workers=2)
  try:
    for step in range(5, 11):
      got, want = next(it), data.train[step]
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} at step {step}")
  finally:
    it.close()


def _command(workdir, *flags):
  return [
    sys.executable,
    "-m",
    "t5jax.train",
    f"--config={ROOT}/configs/multitask.py",
    f"--workdir={workdir}",
    *TINY,
    *flags,
  ]


def _losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r}


def _children(pid):
  out = []
  for d in os.listdir("/proc"):
    try:
      with open(f"/proc/{d}/stat") as f:
        if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          out.append(int(d))
    except (OSError, ValueError):
      pass
  return out


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def test_resume_with_loader_workers_is_exact_and_evaluate_reports_per_task(tmp_path):
  common = [
    "--config.total_steps=12",
    "--config.log_every=1",
    "--config.eval_every=12",
    "--config.decode_eval_every=12",
    "--config.data.packing.enabled=false",
  ]
  run_a = str(tmp_path / "a")
  out = subprocess.run(
    _command(run_a, *common, "--config.checkpoint_every=6", "--config.data.num_workers=0"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "decoded eval at step 12: decode_synthetic_copy_exact_match" in out.stdout

  run_b = str(tmp_path / "b")
  flags_b = [*common, "--config.checkpoint_every=1", "--config.keep_checkpoints=2", "--config.data.num_workers=2"]
  proc = start_until_step(_command(run_b, *flags_b), run_b, 7)
  workers = _children(proc.pid)
  assert len(workers) >= 2, workers  # grain's loader processes (and the resource tracker)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 20
  while time.time() < deadline and any(_alive(w) for w in workers):
    time.sleep(0.1)
  assert not any(_alive(w) for w in workers), "loader workers outlived the killed trainer"
  out = subprocess.run(_command(run_b, *flags_b), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resuming from step" in out.stdout
  a, b = _losses(run_a), _losses(run_b)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert a == b  # bitwise, although B's batches came from worker processes and B was killed mid-run

  ev = subprocess.run(
    [
      sys.executable,
      "-m",
      "t5jax.evaluate",
      f"--config={ROOT}/configs/multitask.py",
      f"--workdir={run_a}",
      "--checkpoint_step=6",
      *TINY,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  row = json.loads(open(os.path.join(run_a, "eval_metrics.jsonl")).read().splitlines()[-1])
  assert row["step"] == 6
  assert {f"decode_{t}_exact_match" for t in TASKS} <= set(row)
  assert "synthetic_reverse: exact_match" in ev.stdout
  assert os.listdir(os.path.join(run_a, "tensorboard", "eval"))


def test_jsonl_files_from_the_config_count_or_reject_malformed_lines(tmp_path):
  rows = [{"question": f"what follows {i}", "answer": str(i + 1)} for i in range(40)]
  with open(tmp_path / "train.jsonl", "w") as f:
    for i, row in enumerate(rows):
      f.write(json.dumps(row) + "\n" + ("{not json\n" if i in (3, 17) else ""))
  with open(tmp_path / "val.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows[:8]))
  jsonl = [
    f"--config.data.jsonl.train={tmp_path}/train.jsonl",
    f"--config.data.jsonl.validation={tmp_path}/val.jsonl",
    "--config.data.jsonl.inputs=question",
    "--config.data.jsonl.targets=answer",
    "--config.data.jsonl.prefix=next: ",
    "--config.data.mixture.tasks=('jsonl', 'synthetic_copy')",
    "--config.total_steps=2",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.decode_eval_every=2",
  ]
  out = subprocess.run(_command(str(tmp_path / "run"), *jsonl), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows_logged = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
  assert [r["malformed_lines_skipped"] for r in rows_logged] == [2, 2]
  assert "decode_jsonl_exact_match" in out.stdout

  strict = subprocess.run(
    _command(str(tmp_path / "strict"), *jsonl, "--config.data.strict=True"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert strict.returncode != 0 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
  assert (
    strict.stderr.strip()
    .splitlines()[-1]
    .endswith(
      f"{tmp_path}/train.jsonl:5: malformed JSONL line (Expecting property name enclosed in double quotes: "
      "line 1 column 2 (char 1))"
    )
  )
  assert not os.path.exists(tmp_path / "strict" / "checkpoints")

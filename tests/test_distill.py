"""Logit distillation (t5jax/distill.py): the KL and ULD losses against numpy, gradients to the student only,
one and eight devices alike, an end-to-end run that trains its teacher first and resumes exactly, and bad
input refused in one line."""

import os
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, host_devices_env, start_until_step, tiny_distill_command
from t5jax import distill, losses, parallel, setup, train
from t5jax.workdir import checkpoint
from t5jax.hf import t5 as hf
from t5jax.data.tokenizer import Tokenizer
from t5jax.metrics import read_metrics
from t5jax.model import T5, T5Config, init_params


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(seed, vocab, shape=(2, 5)):
  return np.random.default_rng(seed).normal(size=shape + (vocab,)).astype(np.float32) * 3


WEIGHTS = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)


def test_kl_matches_numpy_and_is_zero_for_the_teacher_itself():
  s, t, temperature = _logits(0, 7), _logits(1, 7), 2.0
  p, q = _softmax(t / temperature), _softmax(s / temperature)
  want = ((p * (np.log(p) - np.log(q))).sum(-1) * WEIGHTS).sum() * temperature**2
  np.testing.assert_allclose(float(distill.kl_sums(s, t, WEIGHTS, temperature)), want, rtol=1e-5)
  assert abs(float(distill.kl_sums(t, t, WEIGHTS, temperature))) < 1e-6
  # Padded positions do not count: changing them leaves the sum alone.
  s2 = s.copy()
  s2[0, 3:] = 100.0
  assert float(distill.kl_sums(s2, t, WEIGHTS, 1.0)) == float(distill.kl_sums(s, t, WEIGHTS, 1.0))


def test_uld_is_zero_for_identical_distributions_blind_to_token_order_and_spans_vocab_sizes():
  s, t = _logits(2, 9), _logits(3, 6)
  assert abs(float(distill.uld_sums(s, s, WEIGHTS, 1.0))) < 1e-6
  perm = np.random.default_rng(4).permutation(9)
  assert abs(float(distill.uld_sums(s[..., perm], s, WEIGHTS, 1.0))) < 1e-6
  # Different vocab sizes: sorted probabilities, the shorter padded with zeros, L1 apart.
  ps, pt = -np.sort(-_softmax(s / 2.0), -1), -np.sort(-_softmax(t / 2.0), -1)
  pt = np.pad(pt, [(0, 0), (0, 0), (0, 3)])
  want = (np.abs(ps - pt).sum(-1) * WEIGHTS).sum()
  np.testing.assert_allclose(float(distill.uld_sums(s, t, WEIGHTS, 2.0)), want, rtol=1e-5)
  np.testing.assert_allclose(float(distill.uld_sums(t, s, WEIGHTS, 2.0)), want, rtol=1e-5)
  assert want > 0.1


TINY = dict(
  vocab_size=64,
  d_model=16,
  num_heads=2,
  d_kv=8,
  d_ff=32,
  num_encoder_layers=1,
  num_decoder_layers=1,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
)


def _batch(vocab=64, rows=2, length=6, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, vocab, (rows, length)).astype(np.int32)
  return {
    "encoder_input_tokens": rng.integers(2, vocab, (rows, length)).astype(np.int32),
    "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
    "decoder_target_tokens": targets,
    "decoder_loss_weights": np.ones((rows, length), np.float32),
  }


@pytest.mark.parametrize("loss,teacher_vocab", [("kl", 64), ("uld", 96)])
def test_gradients_reach_the_student_only(loss, teacher_vocab):
  student_config, teacher_config = T5Config(**TINY), T5Config(**dict(TINY, vocab_size=teacher_vocab, d_model=32))
  student = init_params(student_config, jax.random.PRNGKey(0))
  teacher = init_params(teacher_config, jax.random.PRNGKey(1))
  batch = _batch()

  def total(student_params, teacher_params, alpha):
    logits = T5(student_config).apply(
      {"params": student_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )
    m = losses.loss_sums(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    distiller = distill.Distiller(T5(teacher_config), loss, alpha, 2.0)
    return distiller.add_loss(m, logits, batch, teacher_params)["loss_sum"]

  @jax.jit
  def grads(student_params, teacher_params):
    g_student, g_teacher = jax.grad(total, argnums=(0, 1))(student_params, teacher_params, 0.5)
    return g_student, g_teacher, jax.grad(total)(student_params, teacher_params, 1.0)

  g_student, g_teacher, g_labels_only = grads(student, teacher)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  # The teacher's term moves the student: its gradient differs from the labels-only one.
  pairs = zip(jax.tree.leaves(g_student), jax.tree.leaves(g_labels_only), strict=True)
  diff = max(float(jnp.abs(a - b).max()) for a, b in pairs)
  assert diff > 1e-4


_DEVICES_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import dataclasses
import jax
import numpy as np
from configs import distill as distill_config
from t5jax import distill, parallel, setup
from t5jax.model import T5Config, init_params

out = {}
for loss in ("kl", "uld"):
  config = distill_config.get_config(loss)
  config.batch_size = 8
  config.model.update(d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
  config.distill.teacher_dtype = "float32"
  config.distill.teacher_tokenizer = "teacher.model" if loss == "uld" else None   # teacher_* features
  student = T5Config.from_dict(config.model.to_dict())
  teacher = dataclasses.replace(student, d_model=64, d_ff=128, vocab_size=384 if loss == "uld" else 512)
  teacher_params = jax.device_get(init_params(teacher, jax.random.PRNGKey(7)))
  for name, mesh_config, devices in (("one", {"data": 1}, jax.devices()[:1]),
                                     ("eight", {"data": 2, "fsdp": 2, "tensor": 2}, None)):
    config.mesh.update(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh_config)
    mesh = parallel.make_mesh(config.mesh, devices)
    with parallel.use_mesh(mesh):
      term = distill.teacher_term(config, mesh, teacher, student, teacher_params)
      run = setup.build(config, mesh, [term])   # the student's features, and the teacher's own with uld
      rng = np.random.default_rng(0)
      batch = {k: rng.integers(2, 380, v.shape).astype(v.dtype) for k, v in run.batch_spec.items()}
      for k, v in batch.items():   # real targets of different lengths, padding after them
        if k.endswith("loss_weights"):
          batch[k] = (np.arange(v.shape[1]) < rng.integers(3, v.shape[1], (v.shape[0], 1))).astype(np.int32)
      state = run.init_state()
      step = run.with_term_args(run.train_step)   # the teacher's params placed on their shardings once
      _, m = step(state, parallel.host_to_global(batch, run.batch_sharding))
    for key in ("loss_sum", "cross_entropy_sum", "distill_loss_sum", "grad_norm"):
      out[f"{loss}/{name}/{key}"] = np.float64(m[key])
np.savez(sys.argv[2], **out)
"""


def test_teacher_and_student_on_eight_devices_give_the_one_device_loss(tmp_path):
  """Student and teacher sharded over data x fsdp x tensor (2 x 2 x 2): the loss, its two parts and the
  gradient norm match one device's, for kl and for uld with the teacher's own tokenization."""
  out = subprocess.run(
    [sys.executable, "-c", _DEVICES_SCRIPT, ROOT, str(tmp_path / "m.npz")],
    cwd=ROOT,
    env=host_devices_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  saved = np.load(tmp_path / "m.npz")
  for key in [k for k in saved.files if "/one/" in k]:
    assert saved[key] > 0, key
    np.testing.assert_allclose(saved[key.replace("/one/", "/eight/")], saved[key], rtol=1e-5, err_msg=key)


def test_the_data_carries_the_teachers_own_tokenization_of_each_example(tmp_path):
  """configs/distill.py:uld's batches: the student's features plus `teacher_*` ones, as seams.batch_spec says
  with the teacher's loss term, each row the same example in the teacher's tokenizer (a real SentencePiece model
  with fewer pieces)."""
  from configs import distill as distill_config
  from t5jax import seams
  from t5jax.data import pipeline

  teacher_config = distill_config.get_config("none")
  teacher_config.data.tokenizer.spm_vocab_size = 300
  teacher_tok = pipeline.from_config(teacher_config, tmp_path / "t").tokenizer
  assert teacher_tok.vocab_size == 400
  config = distill_config.get_config("uld")
  config.batch_size = 4
  config.data.tokenizer.spm_vocab_size = 400
  term = distill.Teacher(None, None, None, None, tokenizer=teacher_tok.model_path)
  data = pipeline.from_config(config, tmp_path / "s", **term.data_options())
  batch = data.train[3]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == seams.batch_spec(config, rows=4, terms=[term])
  for name in ("encoder_input_tokens", "decoder_target_tokens"):
    whole = (batch[name][:, -1] == 0) & (batch[f"teacher_{name}"][:, -1] == 0)  # rows neither one trimmed
    assert whole.sum() >= 2
    for student_row, teacher_row in zip(batch[name][whole], batch[f"teacher_{name}"][whole], strict=True):
      assert data.tokenizer.decode(student_row[student_row > 1]) == teacher_tok.decode(teacher_row[teacher_row > 1])
  assert (batch["teacher_decoder_loss_weights"] != batch["decoder_loss_weights"]).any()  # other lengths


def _losses(workdir):
  return [
    (r["step"], r["loss"], r["cross_entropy"], r["distill_loss"])
    for r in read_metrics(f"{workdir}/metrics.jsonl")
    if "loss" in r
  ]


def test_a_run_trains_its_teacher_then_distills_and_resumes_exactly(tmp_path):
  """configs/distill.py:uld with no teacher: a teacher with its own tokenizer is trained first, then the
  student learns from its logits; a SIGTERM mid-run and a rerun end with the same losses and params."""
  ref = str(tmp_path / "ref")
  out = subprocess.run(tiny_distill_command(ref), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"training one first in {ref}/teacher" in out.stdout
  assert os.path.isdir(f"{ref}/teacher/checkpoints/3")
  rows = _losses(ref)
  assert [r[0] for r in rows] == list(range(1, 9))
  assert all(np.isfinite(r[1:]).all() and r[3] > 0 for r in rows)
  # alpha = 0.5: the logged loss mixes the two parts (plus the small z-loss).
  assert all(abs(r[1] - 0.5 * (r[2] + r[3])) < 0.01 for r in rows), rows
  # The checkpoint holds the student only, and the teacher read its own tokenization (a smaller vocab).
  params, meta = checkpoint.load_params(f"{ref}/checkpoints")
  assert params["shared_embedding"]["embedding"].shape == (512, 16)
  assert meta["config"]["distill"]["teacher_tokenizer"] == f"{ref}/teacher/spiece.model"
  # kl from that teacher would match logits of different tokens: refused, naming both tokenizers.
  kl = distill.Teacher(None, distill.Distiller(None, "kl", 0.5, 2.0), None, None, path=f"{ref}/teacher")
  with pytest.raises(ValueError, match=f"teacher's tokenizer {ref}/teacher/spiece.model differs from the student's"):
    kl.check_data(types.SimpleNamespace(tokenizer=Tokenizer(f"{ref}/spiece.model")))

  resumed = str(tmp_path / "resumed")
  flags = [f"--config.distill.teacher={ref}/teacher", f"--config.distill.teacher_tokenizer={ref}/teacher/spiece.model"]
  proc = start_until_step(tiny_distill_command(resumed, *flags), resumed, 3)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
  assert len(_losses(resumed)) < 8
  again = subprocess.run(tiny_distill_command(resumed, *flags), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from step" in again.stdout
  assert _losses(resumed) == rows
  resumed_params, _ = checkpoint.load_params(f"{resumed}/checkpoints")
  jax.tree.map(np.testing.assert_array_equal, resumed_params, params)


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def _config(**distill_settings):
  from configs import distill as distill_config

  config = distill_config.get_config()
  config.distill.update(distill_settings)
  return config


@pytest.mark.parametrize(
  "settings,error",
  [
    (dict(alpha=1.5), "config.distill.alpha=1.5 must be in [0, 1]"),
    (dict(alpha=-0.1), "config.distill.alpha=-0.1 must be in [0, 1]"),
    (dict(temperature=0.0), "config.distill.temperature=0.0 must be positive"),
    (dict(loss="mse"), "config.distill.loss='mse' is unknown"),
    (dict(teacher_dtype="float16"), "config.distill.teacher_dtype='float16' is unknown"),
    (dict(teacher="/no/such/teacher"), "config.distill.teacher=/no/such/teacher: no such directory"),
    (dict(), "config.distill.teacher is not set: name a teacher checkpoint, or run python -m t5jax.distill"),
  ],
)
def test_bad_settings_are_named(settings, error):
  with pytest.raises((ValueError, FileNotFoundError), match=error.replace("[", r"\[").replace("]", r"\]")):
    train.check_config(_config(**settings))


def test_an_unreadable_teacher_is_named(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  config = _config(teacher=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"config.distill.teacher={tmp_path}: .*neither a t5jax directory"):
    distill.load_teacher(config)


def test_kl_across_vocabularies_names_both_sizes_and_suggests_uld(tmp_path):
  config = _config(loss="kl")
  teacher_config = T5Config(**dict(TINY, vocab_size=384))
  hf.save_hf(init_params(teacher_config, jax.random.PRNGKey(0)), teacher_config, str(tmp_path / "hf"))
  config.distill.teacher = str(tmp_path / "hf")
  _, loaded = distill.load_teacher(config)  # a Hugging Face directory, read as one
  assert loaded.vocab_size == 384 and loaded.dtype == "bfloat16"
  mesh = parallel.make_mesh(config.mesh)
  with (
    parallel.use_mesh(mesh),
    pytest.raises(ValueError, match="teacher's has 384 entries and the student's 512; use config.distill.loss='uld'"),
  ):
    setup.build(config, mesh)  # the teacher's loss term reads the directory
  config.distill.update(loss="uld", teacher_tokenizer=str(tmp_path / "hf" / "config.json"))
  config.distill.loss = "kl"
  with pytest.raises(ValueError, match="teacher has its own tokenizer .*; use config.distill.loss='uld'"):
    train.check_config(config)


def test_a_missing_teacher_fails_the_cli_in_one_line(tmp_path):
  out = subprocess.run(
    tiny_distill_command(str(tmp_path / "wd"), "--config.distill.teacher=/no/teacher"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "config.distill.teacher=/no/teacher: no such directory" in out.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "wd")

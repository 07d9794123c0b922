"""Logit distillation: a frozen teacher T5 inside the train step, and the KL / ULD losses against its logits.

  python -m t5jax.train --config=configs/distill.py --workdir=DIR --config.distill.teacher=TEACHER_DIR
  python -m t5jax.distill --config=configs/distill.py --workdir=DIR   (two steps: WORKDIR/teacher, then DIR)

The teacher is any checkpoint `t5jax.load_checkpoint` reads (a t5jax workdir or a Hugging Face T5 directory).
It is a loss term of the train step (`steps.LossTerm`, registered in seams.py): its params are loaded once,
cast to `config.distill.teacher_dtype`, sharded over the mesh by the same logical axis rules as the student's,
and passed to the jitted train step as an extra argument: no gradient, no optimizer state, and not in the
checkpoints (they hold the student only, so resuming is unchanged). Run as a program, this module first
trains a teacher from `config.distill.teacher_train` when none is named, then the student.

The step's loss is `alpha * cross_entropy + z_loss + (1 - alpha) * distill_loss`, each summed over target
tokens and divided once by the global token count like every other term (steps.py); metrics.jsonl logs
`cross_entropy` and `distill_loss` apart. With `config.distill.teacher_tokenizer` the teacher reads its own
tokenization of each example (the `teacher_*` batch features, data/mixtures.py), for `uld` across tokenizers.
"""

import dataclasses
import functools
import os
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from t5jax import cli, parallel, storage, train
from t5jax.data import specs
from t5jax.data.mixtures import TEACHER_PREFIX
from t5jax.model import T5, T5Config, init_params, param_axes
from t5jax.model.config import DTYPES
from t5jax.workdir.record import md5_file

LOSSES = ("none", "kl", "uld")


def enabled(config):
  """Whether `config` distills (configs without a `distill` group never do)."""
  d = config.get("distill")
  return d is not None and d.loss != "none"


def check_config(config, teacher_first=False):
  """One-line errors for distillation settings that cannot work (train.check_config calls this, through
  seams.py). `teacher_first`: the teacher may be missing, as this module's two steps train one."""
  d = config.get("distill")
  if d is None:
    return
  if d.loss not in LOSSES:
    raise ValueError(f"config.distill.loss={d.loss!r} is unknown; choose one of {LOSSES}")
  if d.loss == "none":
    return
  if not 0.0 <= d.alpha <= 1.0:
    raise ValueError(f"config.distill.alpha={d.alpha} must be in [0, 1] (the weight of the label loss)")
  if d.temperature <= 0:
    raise ValueError(f"config.distill.temperature={d.temperature} must be positive")
  if d.teacher_dtype not in DTYPES:
    raise ValueError(f"config.distill.teacher_dtype={d.teacher_dtype!r} is unknown; choose one of {DTYPES}")
  if d.teacher and not storage.isdir(storage.check(d.teacher, "config.distill.teacher")):
    raise FileNotFoundError(f"config.distill.teacher={d.teacher}: no such directory")
  if not d.teacher and not teacher_first:
    raise ValueError(
      "config.distill.teacher is not set: name a teacher checkpoint, or run python -m t5jax.distill with the "
      "same flags, which first trains one into WORKDIR/teacher"
    )
  if not d.teacher and "teacher_train" not in d:
    raise ValueError("config.distill.teacher is not set, and no config.distill.teacher_train says what to train")
  if d.teacher_tokenizer:
    if d.loss == "kl":
      raise ValueError(
        f"config.distill.loss='kl' compares the two vocabularies entry by entry, but the teacher "
        f"has its own tokenizer ({d.teacher_tokenizer}); use config.distill.loss='uld'"
      )
    if not storage.isfile(storage.check(d.teacher_tokenizer, "config.distill.teacher_tokenizer")):
      raise FileNotFoundError(f"config.distill.teacher_tokenizer={d.teacher_tokenizer}: no such file")
    if config.data.kind != "tasks" or config.data.packing.enabled:
      raise ValueError(
        "config.distill.teacher_tokenizer needs unpacked task rows (config.data.kind='tasks', "
        "config.data.packing.enabled=False): teacher and student align by position per example"
      )
  if config.parallel.mode != "jit":
    raise ValueError(f"config.distill needs config.parallel.mode='jit', not {config.parallel.mode!r}")


# ---------------------------------------------------------------------------------------------------------
# The losses, summed over target tokens (the train step divides once by the global token count).


def kl_sums(student_logits, teacher_logits, weights, temperature):
  """Hinton's loss: sum over weighted tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T)).

  The T^2 keeps the gradient's scale independent of T (soft targets' gradients shrink as 1 / T^2).
  Shapes: logits [batch, length, vocab] (same vocab), weights [batch, length].
  """
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * weights) * temperature**2


def uld_sums(student_logits, teacher_logits, weights, temperature):
  """Universal Logit Distillation (Boizard et al., 2024): sum over weighted tokens of the L1 distance between
  the two distributions' probabilities, each sorted in decreasing order, the smaller vocab padded with zeros.

  With the probabilities sorted, this is the Wasserstein-1 distance between the two distributions under a
  cost that ignores token identity, so it works across vocabularies of any sizes. What that gives up: the
  student learns how peaked the teacher is and how its mass falls off over its ranked guesses, but not
  *which* token takes that mass (a student confidently wrong scores as well as one confidently right; the
  cross-entropy term carries the labels). And position i of the student's targets is only roughly position
  i of the teacher's when the two tokenizers segment the text differently.
  Shapes: logits [batch, length, vocab_s] and [batch, length, vocab_t], weights [batch, length].
  """

  def ranked(logits):
    p = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sort(-p, axis=-1)  # descending (negated: jnp.sort is ascending)

  s, t = ranked(student_logits), ranked(teacher_logits)
  vocab = max(s.shape[-1], t.shape[-1])
  pad = lambda p: jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, vocab - p.shape[-1])])  # noqa: E731
  return jnp.sum(jnp.sum(jnp.abs(pad(s) - pad(t)), axis=-1) * weights)


LOSS_FNS = {"kl": kl_sums, "uld": uld_sums}


# ---------------------------------------------------------------------------------------------------------
# The teacher in the step.


@dataclasses.dataclass(frozen=True)
class Distiller:
  """What the train step needs of distillation: the teacher model and the loss settings."""

  teacher: T5
  loss: str
  alpha: float
  temperature: float

  def teacher_logits(self, teacher_params, batch):
    """The teacher's logits for `batch`: its own `teacher_*` features if the batch has them, else the
    student's. Frozen: stop_gradient, and no dropout."""
    own = {k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
    args, kwargs = self.teacher.batch_inputs(own or batch)
    logits = self.teacher.apply({"params": jax.lax.stop_gradient(teacher_params)}, *args, **kwargs)
    return jax.lax.stop_gradient(logits), own

  def add_loss(self, m, student_logits, batch, teacher_params):
    """Summed metrics `m` of the student's label loss -> the distillation mix, with `distill_loss_sum`.

    Teacher and student targets align by position; with the teacher's own tokenization only positions real
    in both count (the shorter sequence decides), still divided by the student's token count."""
    logits, own = self.teacher_logits(teacher_params, batch)
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    if own:
      weights = weights * own["decoder_loss_weights"].astype(jnp.float32)
    d = LOSS_FNS[self.loss](student_logits, logits, weights, self.temperature)
    loss = self.alpha * m["cross_entropy_sum"] + m["z_loss_sum"] + (1.0 - self.alpha) * d
    return dict(m, loss_sum=loss, distill_loss_sum=d)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The run's teacher as a loss term of the train step (steps.LossTerm): its abstract params and shardings,
  the loss against its logits, and where its params come from."""

  model_config: T5Config
  distiller: Distiller
  abstract_arg: Any  # the teacher's params: ShapeDtypeStructs in teacher_dtype, with their shardings
  sharding: Any
  path: str | None = None  # its checkpoint: for the tokenizer check
  tokenizer: str | None = None  # its own SentencePiece model, whose ids the batches then carry
  params: Any = dataclasses.field(default=None, repr=False, compare=False)  # host params in teacher_dtype

  def add_loss(self, m, logits, batch, arg):
    return self.distiller.add_loss(m, logits, batch, arg)

  def batch_features(self, config, rows):
    return specs.text_spec(config, rows, prefix=TEACHER_PREFIX) if self.tokenizer else {}

  def data_options(self):
    return {"teacher_tokenizer": self.tokenizer} if self.tokenizer else {}

  def check_data(self, data):
    """kl compares logits id by id: a teacher directory holding a SentencePiece model (a t5jax workdir or an
    HF T5 directory) must hold the student's tokenizer, or its logits would be matched to the wrong tokens."""
    teacher_spm = os.path.join(self.path, "spiece.model")
    student_spm = data.tokenizer.model_path
    if self.distiller.loss == "kl" and storage.isfile(teacher_spm) and md5_file(teacher_spm) != md5_file(student_spm):
      raise ValueError(
        f"config.distill.loss='kl': the teacher's tokenizer {teacher_spm} differs from the "
        f"student's {student_spm}; set --config.data.tokenizer.path={teacher_spm}, or "
        "use config.distill.loss='uld' with config.distill.teacher_tokenizer"
      )

  def load_arg(self):
    """The teacher's host params; a shape that differs from the teacher's config names the param."""
    if self.params is None:
      raise ValueError("config.distill.teacher is not set: a planned teacher has no params to distill from")
    path_shapes = lambda tree: {
      jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }  # noqa: E731
    want, got = path_shapes(self.abstract_arg), path_shapes(self.params)
    for key in sorted(set(want) | set(got)):
      if want.get(key) != got.get(key):
        raise ValueError(f"teacher param {key} has shape {got.get(key)} but its config implies {want.get(key)}")
    return self.params


def teacher_term(config, mesh, teacher_config, student_config, params=None, path=None):
  """The Teacher of a distilling run on `mesh` (inside `parallel.use_mesh`); creates no device array.
  `teacher_config` computes in teacher_dtype; `params`: its host params (`load_teacher`)."""
  d = config.distill
  if d.loss == "kl" and teacher_config.vocab_size != student_config.vocab_size:
    raise ValueError(
      f"config.distill.loss='kl' needs one vocabulary, but the teacher's has "
      f"{teacher_config.vocab_size} entries and the student's {student_config.vocab_size}; "
      "use config.distill.loss='uld'"
    )
  shapes = jax.eval_shape(lambda key: init_params(teacher_config, key), jax.ShapeDtypeStruct((2,), jnp.uint32))
  sharding = parallel.param_shardings(mesh, param_axes(teacher_config))
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(d.teacher_dtype), sharding=s), shapes, sharding
  )
  distiller = Distiller(T5(teacher_config), d.loss, float(d.alpha), float(d.temperature))
  return Teacher(teacher_config, distiller, abstract, sharding, path, d.teacher_tokenizer or None, params)


def build_term(config, mesh, model_config):
  """seams.py's hook: the Teacher of `config.distill.teacher`, loaded once, or None when the run does not distill.
  With no teacher named (plan, the benchmarks), the one `teacher_train` describes, abstract: it plans as
  `python -m t5jax.distill` would train it, and has no params to train with."""
  if not enabled(config):
    return None
  d = config.distill
  if d.teacher:
    params, teacher_config = load_teacher(config)
  else:
    params = None
    teacher_config = T5Config.from_dict(teacher_run_config(config).model.to_dict())
    teacher_config = dataclasses.replace(teacher_config, dtype=d.teacher_dtype, dropout_rate=0.0)
  return teacher_term(config, mesh, teacher_config, model_config, params, d.teacher)


def load_teacher(config):
  """(host params in teacher_dtype, T5Config computing in teacher_dtype) of `config.distill.teacher`."""
  import t5jax

  path, dtype = config.distill.teacher, config.distill.teacher_dtype
  try:
    params, model_config = t5jax.load_checkpoint(path)
  except (OSError, ValueError) as e:
    raise type(e)(f"config.distill.teacher={path}: {e}") from None
  params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
  return params, dataclasses.replace(model_config, dtype=dtype, dropout_rate=0.0)


# ---------------------------------------------------------------------------------------------------------
# A teacher trained first, when the config names none.


def run(config, workdir):
  """Distillation's two steps: train a teacher from `config.distill.teacher_train` into WORKDIR/teacher when
  none is named (a rerun finds it finished and goes straight on), then the student distilling from it."""
  check_config(config, teacher_first=True)
  if enabled(config):
    config = with_teacher(config, workdir)
  return train.run(config, workdir)


def with_teacher(config, workdir):
  """`config` with `distill.teacher` set: as given, or a teacher trained first into WORKDIR/teacher."""
  if config.distill.teacher:
    return config
  teacher_dir = os.path.join(workdir, "teacher")
  if jax.process_index() == 0:
    print(f"No config.distill.teacher: training one first in {teacher_dir}.", flush=True)
  train.run(teacher_run_config(config), teacher_dir)
  config = config.copy_and_resolve_references()  # a copy: the caller's config stays as given
  config.distill.teacher = teacher_dir
  if config.distill.teacher_train.spm_vocab_size:  # its own tokenizer, recorded beside its checkpoints
    config.distill.teacher_tokenizer = os.path.join(teacher_dir, "spiece.model")
  return config


def teacher_run_config(config):
  """The run that trains the teacher: the student's run with the teacher's model, steps and tokenizer."""
  t = config.distill.teacher_train
  c = config.copy_and_resolve_references()
  c.distill.loss = "none"
  c.model.update(t.model.to_dict())
  c.total_steps, c.batch_size, c.data.packing.enabled = t.total_steps, t.batch_size, t.packing
  if t.spm_vocab_size:
    c.data.tokenizer.spm_vocab_size = t.spm_vocab_size
  return c


if __name__ == "__main__":
  train.define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(functools.partial(train.main, train=run), "t5jax.distill")

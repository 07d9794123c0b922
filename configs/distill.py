r"""Logit distillation on the synthetic multitask data (configs/multitask.py, no download): a student T5 with
about a quarter of the teacher's params learns from the labels and from the teacher's logits.

  python -m t5jax.distill --config=configs/distill.py --workdir=/tmp/t5jax_distill [--config.distill.teacher=DIR]
  python -m t5jax.distill --config=configs/distill.py:uld --workdir=/tmp/t5jax_distill_uld

DIR is any checkpoint t5jax loads (a t5jax workdir, or a Hugging Face T5 directory whose tokenizer the
student's data uses: --config.data.tokenizer.path=DIR/spiece.model). With no teacher named, t5jax.distill first
trains one into WORKDIR/teacher (`distill.teacher_train`: the multitask model, d_model 128), then distills it
into the student (d_model 64). `:uld` trains that teacher with its own, smaller SentencePiece vocabulary and
distills across the two tokenizers with Universal Logit Distillation; `:none` trains the student alone.
Rows are unpacked (one example per row) so the two tokenizations align by position. Loss: alpha * CE +
(1 - alpha) * (KL at temperature T, times T^2 | ULD); metrics.jsonl logs cross_entropy and distill_loss.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import multitask


def get_config(arg=None):
  loss = arg or "kl"
  c = multitask.get_config("unpacked")
  c.eval_every = c.checkpoint_every = c.decode_eval_every = 300
  c.model.update(d_model=64, num_heads=4, d_kv=16, d_ff=192)  # the student: 0.44M params, the teacher 1.6M

  c.distill = ml_collections.ConfigDict()
  c.distill.loss = loss  # none | kl | uld
  c.distill.teacher = placeholder(str)  # a t5jax workdir or HF T5 dir; None = train one first
  c.distill.teacher_tokenizer = placeholder(str)  # the teacher's own SentencePiece model (uld); None = the student's
  c.distill.teacher_dtype = "bfloat16"  # the frozen teacher's params and compute; the student stays float32
  c.distill.alpha = 0.5  # weight of the label cross-entropy; 1 - alpha on the distillation
  c.distill.temperature = 2.0  # softens both distributions (kl is scaled by T^2)
  # The teacher trained into WORKDIR/teacher when none is named: configs/multitask.py's model.
  c.distill.teacher_train = ml_collections.ConfigDict(
    dict(
      total_steps=c.total_steps,
      batch_size=c.batch_size,
      packing=True,  # packed rows: it learns faster
      spm_vocab_size=300 if loss == "uld" else placeholder(int),  # its own tokenizer; None = the student's
      model=ml_collections.ConfigDict(
        dict(d_model=128, num_heads=4, d_kv=32, d_ff=384, vocab_size=400 if loss == "uld" else c.model.vocab_size)
      ),
    )
  )
  return c

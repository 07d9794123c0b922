"""Three students at the same steps on the synthetic multitask data: trained alone, distilled from a teacher
with the same tokenizer (Hinton's KL), and from a teacher with its own, smaller SentencePiece vocabulary (300
pieces, model vocab 400, against the student's 329 / 512) by Universal Logit Distillation.

  python -m t5jax.sweep experiments/distill.py

Each distilling point first trains its teacher (1.6M params, 600 steps of 32 packed rows) into
POINT/teacher; each student (0.44M params) trains 600 steps of 32 unpacked rows, alpha 0.5, temperature 2.
Sized for a shared 2-core CPU. Results: experiments/distill/results.md (eval loss is the student's label
cross-entropy + z-loss at every point; decode_* are exact match on 64 held-out examples per task) and
loss_curves.png (train label cross-entropy; the train `loss` mixes in the distillation term).
"""

CONFIG = "configs/distill.py"
ENTRY = "t5jax.distill"  # distillation's two steps: each distilling point trains its teacher, then its student
FLAGS = [
  "--config.total_steps=600",
  "--config.batch_size=32",
  "--config.eval_every=300",
  "--config.decode_eval_every=300",
  "--config.checkpoint_every=600",
  "--config.distill.teacher_train.total_steps=600",
  "--config.distill.teacher_train.batch_size=32",
]
POINTS = [
  {"distill.loss": "none"},
  {"distill.loss": "kl"},
  {"distill.loss": "uld", "distill.teacher_train.spm_vocab_size": 300, "distill.teacher_train.model.vocab_size": 400},
]
PLOT = "cross_entropy"

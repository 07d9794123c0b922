r"""Multitask learning on synthetic tasks generated on the fly (no download): copy, reverse a word list, sort
numbers and add two numbers, each with its T5-style text prefix ("reverse: fox owl cat" -> "cat owl fox").

  python -m t5jax.train --config=configs/multitask.py --workdir=/tmp/t5jax_multitask
  python -m t5jax.evaluate --config=configs/multitask.py --workdir=/tmp/t5jax_multitask

A tiny T5.1.1 (3+3 layers, d_model 128) trained from scratch; the decoded exact match of every task is
logged every `decode_eval_every` steps and by `t5jax.evaluate`. Rows are packed (several short examples per
row: 115 examples per step instead of 64, for the same compute); `:unpacked` pads one example per row.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.total_steps = 1200
  c.batch_size = 64
  c.log_every = 50
  c.eval_every = 400
  c.eval_steps = 2
  c.checkpoint_every = 400
  c.decode_eval_every = 400
  c.decode_eval_examples = 64

  c.data.kind = "tasks"
  c.data.mixture.tasks = ("synthetic_copy", "synthetic_reverse", "synthetic_sort", "synthetic_add")
  c.data.mixture.rate = "equal"
  c.data.tokenizer.spm_vocab_size = 400  # words, digits and byte fallback; digits are split one per piece
  c.data.inputs_length = 32
  c.data.targets_length = 16
  c.data.packing.enabled = arg != "unpacked"
  c.model.vocab_size = 512  # 400 pieces + 100 sentinels, padded to a multiple of 128

  c.optimizer.learning_rate = 0.02
  c.optimizer.warmup_steps = 100
  return c

"""Learning rate x optimizer for span-corruption pretraining of the tiny default model on the embedded corpus.

  python -m t5jax.sweep experiments/optimizer_lr.py

T5's Adafactor (rsqrt schedule) against nanoT5's RMS-scaled AdamW (cosine schedule), each at three peak
learning rates, 200 steps of batch 32 each. Results: experiments/optimizer_lr/results.md.
"""

CONFIG = "configs/base.py"
FLAGS = [
  "--config.total_steps=200",
  "--config.eval_every=100",
  "--config.checkpoint_every=200",
  "--config.optimizer.warmup_steps=20",
]
POINTS = [{"optimizer.name": "adafactor", "optimizer.learning_rate": lr} for lr in (0.003, 0.01, 0.03)] + [
  {
    "optimizer.name": "adamw",
    "optimizer.rms_scaled": True,
    "optimizer.schedule": "cosine",
    "optimizer.learning_rate": lr,
  }
  for lr in (0.003, 0.01, 0.03)
]

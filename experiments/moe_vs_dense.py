"""Dense T5.1.1 against Switch-style mixtures of 4 and 8 experts at equal active FLOPs (top-1 routing, each
expert as wide as the dense FFN, every second FFN sparse), span corruption on the embedded corpus.

  python -m t5jax.sweep experiments/moe_vs_dense.py

400 steps of batch 32 each, eval every 50. Results: experiments/moe_vs_dense/results.md, the eval loss
against steps in eval_loss_by_step.md and eval_loss_curves.png (train loss: loss_curves.png); the README's
"Mixture of experts" section reads them.
"""

CONFIG = "configs/moe.py"
FLAGS = ["--config.total_steps=400", "--config.eval_every=50", "--config.checkpoint_every=400"]
POINTS = [{"model.moe.num_experts": n} for n in (0, 4, 8)]  # 0 = the dense model (no moe group)

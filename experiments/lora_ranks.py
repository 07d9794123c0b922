"""Full fine-tuning against LoRA rank 4 and rank 16, from the same pretrained tiny T5, on configs/multitask.py's
four synthetic tasks (copy, reverse, sort, add).

  python -m t5jax.train --config=configs/base.py --workdir=workdirs/lora_ranks_base --config.total_steps=200
  python -m t5jax.sweep experiments/lora_ranks.py

The base is configs/base.py's tiny model pretrained with span corruption on the embedded corpus (200 steps of
32 rows: experiments/ul2_vs_span.py's span-corruption model);
every point fine-tunes it 600 steps (64 packed rows each) with its tokenizer (4,000 pieces, model vocab 4,224)
and AdamW with a cosine schedule: full fine-tuning at 1e-3, LoRA (every linear layer, alpha 16) at 5e-3, as
LoRA usually takes a higher rate. AdamW, not Adafactor: Adafactor scales each update by the param's RMS (at
least 1e-3), and LoRA's B starts at zero. Results: experiments/lora_ranks/results.md (decode_*_exact_match on
64 held-out examples per task) and the curves; trained params are in docs/lora.md.
"""

BASE = "workdirs/lora_ranks_base"
CONFIG = "configs/multitask.py"
FLAGS = [
  f"--config.init_from={BASE}",
  f"--config.data.tokenizer.path={BASE}/spiece.model",
  "--config.model.vocab_size=4224",
  "--config.total_steps=600",
  "--config.eval_every=300",
  "--config.decode_eval_every=300",
  "--config.checkpoint_every=600",
  "--config.optimizer.name=adamw",
  "--config.optimizer.schedule=cosine",
  "--config.optimizer.warmup_steps=50",
]
POINTS = [
  {"finetune.lora.rank": 0, "optimizer.learning_rate": 0.001},
  {"finetune.lora.rank": 4, "optimizer.learning_rate": 0.005},
  {"finetune.lora.rank": 16, "optimizer.learning_rate": 0.005},
]

r"""A Switch-Transformer T5: every second FFN (layers 1, 3, ...) is a mixture of experts, top-1 routed, on the
span-corruption task of configs/base.py (the embedded corpus, no download).

  python -m t5jax.train --config=configs/moe.py --workdir=/tmp/t5jax_moe          # 8 experts
  python -m t5jax.train --config=configs/moe.py:4 --workdir=/tmp/t5jax_moe4       # 4 experts

Each expert is as wide as the dense FFN and each token goes to one expert, so a step costs about the dense
model's FLOPs (plus the router) while the sparse layers hold `num_experts` times the FFN parameters. The
router's load-balancing loss (0.01) and z-loss (1e-3) join the training loss; metrics.jsonl logs them with
the fraction of tokens dropped, the router entropy and each expert's load. Shard the experts over devices
with `--config.mesh.expert=N` (N dividing num_experts). Router settings: `config.model.moe`, T5Config's MoeConfig.
"""

import dataclasses

import ml_collections

from configs import base
from t5jax.model.config import MoeConfig


def get_config(arg=None):
  c = base.get_config()
  c.model.moe = ml_collections.ConfigDict(dataclasses.asdict(MoeConfig()))  # every field, so each overrides
  c.model.moe.update(
    num_experts=int(arg or 8),  # 0: the dense model (experiments/moe_vs_dense.py's baseline)
    router="token_choice",
    top_k=1,  # Switch: each token to its best expert
    every_encoder=2,
    every_decoder=2,  # Switch's placement: layers 1, 3, ... are sparse
    capacity_factor_train=1.25,
    capacity_factor_eval=2.0,
    # Routing groups of 256 tokens: the one-hot dispatch costs tokens x experts x capacity x d_model, and
    # capacity grows with the group, so at this small width large groups cost as much as the experts.
    group_size=256,
  )
  return c

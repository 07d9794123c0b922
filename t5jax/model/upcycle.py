"""Sparse upcycling (Komatsuzaki et al. 2022): a dense T5's params laid out for an MoE config, every expert of a
sparse layer a copy of that layer's dense FFN. The routers are not made here: they start fresh.

Works on the unscanned flat layout (`flax.traverse_util.flatten_dict`, `layers_{i}` keys), for each layer
`config.is_sparse` names (dense layers stay as they are):
  {stack}/layers_{i}/mlp/{wi | wi_0, wi_1, wo}/kernel [in, out]  ->  .../mlp/experts/{same name} [experts, in, out]
"""

import numpy as np

from t5jax.model.layer_stack import STACKS


def check_compatible(loaded, config, path):
  """Raises a one-line ValueError when checkpoint `path` (built with `loaded`) cannot initialize `config` because
  of its experts: an MoE checkpoint into a dense model, or into another number of experts."""
  have, want = loaded.num_experts, config.num_experts
  if have and not want:
    raise ValueError(
      f"{path}: a mixture-of-experts checkpoint (num_experts={have}) cannot initialize a dense "
      f"model (config.model has no moe group); give it one with moe.num_experts={have} (configs/moe.py)"
    )
  if have and have != want:
    raise ValueError(
      f"{path}: the checkpoint has num_experts={have} but config.model.moe.num_experts={want}; "
      "only a dense checkpoint is upcycled to another number of experts"
    )


def is_upcycling(loaded, config):
  return not loaded.num_experts and config.num_experts > 0


def upcycle_flat_in_place(flat, config):
  """Dense FFN kernels of the layers `config` makes sparse -> stacked expert kernels (read-only numpy views:
  the copies are made when they are put on devices). A kernel the checkpoint lacks is left missing, for the
  caller's check to name."""
  for stack in STACKS:
    for i in range(getattr(config, f"num_{stack}_layers")):
      if not config.is_sparse(stack, i):
        continue
      mlp = (stack, f"layers_{i}", "mlp")
      for name in [k[3] for k in list(flat) if k[:3] == mlp and k[4:] == ("kernel",)]:
        dense = np.asarray(flat.pop(mlp + (name, "kernel")))
        flat[mlp + ("experts", name)] = np.broadcast_to(dense, (config.num_experts,) + dense.shape)
  return flat


def is_router(path):
  """Whether a flat param path is an MoE router's (fresh under upcycling)."""
  return "router" in path

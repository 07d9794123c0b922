"""The two layouts of a stack's layers: unscanned `layers_{i}/...` and scanned `layers/...` (nn.scan's, with
a leading 'layers' axis), and the conversions between them.

When MoE layers come every N > 1 layers, nn.scan steps over blocks of N layers (`config.scan_block`), and the
scanned layout is `layers/layer_{j}/...`, stacking layers j, j + N, j + 2N, ...

They work on flat `{path tuple: array}` dicts (`flax.traverse_util.flatten_dict`) and convert leaf by leaf,
dropping each layer's array as it is stacked, so a converted checkpoint needs at most one extra leaf of
memory when nothing else holds the arrays (Hugging Face import of large models relies on it).
"""

import jax.numpy as jnp
from flax import traverse_util

STACKS = ("encoder", "decoder")


def _layer_counts(config):
  return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def _scanned_prefix(stack, block, j):
  """Where layer j of every scanned block lives."""
  return (stack, "layers") if block == 1 else (stack, "layers", f"layer_{j}")


def stack_flat_in_place(flat, config):
  """Unscanned -> scanned, in `flat` itself (its per-layer entries are popped as they are stacked)."""
  for stack, n in _layer_counts(config).items():
    block = config.scan_block(stack)
    for j in range(block):
      first = (stack, f"layers_{j}")
      for sub in [k[2:] for k in list(flat) if k[:2] == first]:
        flat[_scanned_prefix(stack, block, j) + sub] = jnp.stack(
          [flat.pop((stack, f"layers_{i}") + sub) for i in range(j, n, block)]
        )
  return flat


def unstack_flat_in_place(flat, config):
  """Scanned -> unscanned, in `flat` itself; entries already unscanned are left as they are."""
  for stack, n in _layer_counts(config).items():
    block = config.scan_block(stack)
    for key in [k for k in list(flat) if k[:2] == (stack, "layers")]:
      j, sub = (0, key[2:]) if block == 1 else (int(key[2].removeprefix("layer_")), key[3:])
      stacked = flat.pop(key)
      for b in range(n // block):
        flat[(stack, f"layers_{b * block + j}") + sub] = stacked[b]
  return flat


def stack_layers(params, config):
  """Unscanned params (layers_{i}) -> the scan layout; the caller's tree is left as it was."""
  return traverse_util.unflatten_dict(stack_flat_in_place(traverse_util.flatten_dict(params), config))


def unstack_layers(params, config):
  """The inverse of stack_layers; unscanned params are returned as they are."""
  return traverse_util.unflatten_dict(unstack_flat_in_place(traverse_util.flatten_dict(params), config))


def to_layout(params, from_config, scan_layers):
  """`params` of a model built with `from_config`, in the layout `scan_layers` asks for."""
  if from_config.scan_layers == scan_layers:
    return params
  return (stack_layers if scan_layers else unstack_layers)(params, from_config)

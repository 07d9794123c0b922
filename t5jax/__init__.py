"""t5jax: a functional JAX/Flax T5 for research. `from_pretrained` loads any T5 checkpoint we can read.

  model, params, config = t5jax.from_pretrained(path)
  logits = model.apply({"params": params}, input_ids, decoder_input_ids, attention_mask=mask)
"""

import dataclasses
import os

from t5jax import platforms

platforms.cpu_unless_accelerator()


def load_checkpoint(path, step=None):
  """(params, T5Config) from an HF T5 directory, a t5jax workdir or a converted directory.

  A t5jax directory holds `checkpoints/<step>/` (the latest step unless `step` is given); an HF one holds
  config.json and model.safetensors (possibly sharded) or pytorch_model.bin.
  """
  from t5jax import checkpoint, hf, workdir
  from t5jax.model import T5Config

  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    params, meta = checkpoint.load_params(os.path.join(path, "checkpoints"), step)
    return params, T5Config.from_dict(meta["config"]["model"]).validate()
  if workdir.is_run_record(path):
    raise FileNotFoundError(f"{path}: a t5jax workdir with no checkpoints yet (its run saves one every "
                            "config.checkpoint_every steps)")
  if os.path.isfile(os.path.join(path, "config.json")) or hf.has_hf_weights(path):
    return hf.load_hf(path)
  raise FileNotFoundError(f"{path}: neither a t5jax directory (checkpoints/) nor a Hugging Face T5 directory "
                          "(config.json + model.safetensors or pytorch_model.bin)")


def from_pretrained(path, scan_layers=None, step=None):
  """(model, params, config) for a checkpoint directory (see `load_checkpoint`).

  `scan_layers` picks the params layout (default: as stored; HF checkpoints are unscanned). Params come back
  as jax arrays on the default device, converted leaf by leaf so host memory holds one extra tensor at most.
  """
  import jax

  from flax import traverse_util

  from t5jax.model import T5, layer_stack

  params, config = load_checkpoint(path, step)
  if scan_layers is not None and scan_layers != config.scan_layers:
    params = layer_stack.to_layout(params, config, scan_layers)
    config = dataclasses.replace(config, scan_layers=scan_layers)
  flat = traverse_util.flatten_dict(params)
  del params   # so each host array is freed as soon as its device copy exists
  for key, value in flat.items():   # HF imports are jax arrays already; Orbax restores numpy
    if not isinstance(value, jax.Array):
      flat[key] = jax.device_put(value)
  return T5(config), traverse_util.unflatten_dict(flat), config


def load_params_for(path, config, shapes=None):
  """Params from checkpoint `path` laid out for model `config` (train.py's `init_from`: weights only).

  `shapes`: the expected params pytree (anything with `.shape` leaves, e.g. train.py's abstract state
  params); default `param_shapes(config)`, which cannot run inside an active mesh context.

  The checkpoint's layer layout (scanned or not) is adapted to `config.scan_layers`; any other difference
  (a shape, a missing or extra param) raises a ValueError naming the param and both shapes.
  """
  import jax

  from t5jax.model import layer_stack, param_shapes

  params, loaded = load_checkpoint(path)
  params = layer_stack.to_layout(params, loaded, config.scan_layers)
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(
      param_shapes(config) if shapes is None else shapes)[0]}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ValueError(f"{path}: param {key} has shape {got.get(key)} but config.model implies {want.get(key)} "
                       "(None = absent)")
  return params


__all__ = ["from_pretrained", "load_checkpoint", "load_params_for"]

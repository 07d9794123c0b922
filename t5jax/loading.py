"""Loading weights: a checkpoint directory (a t5jax workdir, a converted directory or a Hugging Face T5 one)
-> params and T5Config, for inference (`from_pretrained`), for a run's `init_from` (`load_params_for`, laid out
for the run's model) and for a LoRA run's adapters (merged into their base once, `merge_adapters`).

Heavy imports wait inside the functions, so `import t5jax` stays quick.
"""

import dataclasses
import functools
import os


def load_checkpoint(path, step=None, merge_lora=True):
  """(params, T5Config) from an HF T5 directory, a t5jax workdir or a converted directory.

  A t5jax directory holds `checkpoints/<step>/` (the latest step unless `step` is given; a LoRA run's adapters
  come back merged into its base); an HF one holds config.json and model.safetensors (possibly sharded) or
  pytorch_model.bin.
  """
  import ml_collections

  from t5jax import lora, storage
  from t5jax.workdir import checkpoint, record as workdir
  from t5jax.hf import t5 as hf
  from t5jax.model import T5Config

  if not storage.isdir(storage.check(path, "checkpoint")):
    raise FileNotFoundError(f"{path}: no such directory")
  if storage.isdir(os.path.join(path, "checkpoints")):
    params, meta = checkpoint.load_params(os.path.join(path, "checkpoints"), step)
    if lora.enabled(ml_collections.ConfigDict(meta["config"])):  # adapters: merged into their base once
      if not merge_lora:
        raise ValueError(f"{path} holds a LoRA run's adapters, not a whole model; merge them into their base")
      params = merge_adapters(params, meta, path)
    return params, T5Config.from_dict(meta["config"]["model"]).validate()
  if workdir.is_run_record(path):
    raise FileNotFoundError(
      f"{path}: a t5jax workdir with no checkpoints yet (its run saves one every config.checkpoint_every steps)"
    )
  if os.path.isfile(os.path.join(path, "config.json")) or hf.has_hf_weights(path):
    return hf.load_hf(path)
  raise FileNotFoundError(
    f"{path}: neither a t5jax directory (checkpoints/) nor a Hugging Face T5 directory "
    "(config.json + model.safetensors or pytorch_model.bin)"
  )


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
  del params  # so each host array is freed as soon as its device copy exists
  for key, value in flat.items():  # HF imports are jax arrays already; Orbax restores numpy
    if not isinstance(value, jax.Array):
      flat[key] = jax.device_put(value)
  return T5(config), traverse_util.unflatten_dict(flat), config


def load_params_for(path, config, shapes=None, fresh=None):
  """Params from checkpoint `path` laid out for model `config` (train.py's `init_from`: weights only).

  `shapes`: the expected params pytree (anything with `.shape` leaves, e.g. train.py's abstract state
  params); default `param_shapes(config)`, which cannot run inside an active mesh context. `fresh`: params
  of `config` (e.g. a fresh init) for the ones the checkpoint lacks by design; default a fresh init.

  Adapted: the layer layout (scanned or not) to `config.scan_layers`; a dense checkpoint into an MoE config is
  upcycled (model/upcycle.py: every expert copies its layer's dense FFN, routers fresh); a text T5 into a video
  config keeps the fresh `video_embed` front end. Any other difference (a shape, a missing or extra param, an
  MoE checkpoint into a dense config) raises a one-line ValueError naming it.
  """
  import jax
  from flax import traverse_util

  from t5jax.model import init_params, layer_stack, param_shapes, upcycle

  params, loaded = load_checkpoint(path)
  upcycle.check_compatible(loaded, config, path)
  flat = layer_stack.unstack_flat_in_place(traverse_util.flatten_dict(params), loaded)
  if upcycle.is_upcycling(loaded, config):
    upcycle.upcycle_flat_in_place(flat, config)
  if config.scan_layers:
    layer_stack.stack_flat_in_place(flat, config)
  want = traverse_util.flatten_dict(param_shapes(config) if shapes is None else shapes)
  by_design = lambda key: (
    (key[0] == "video_embed" and loaded.video is None)  # noqa: E731
    or (upcycle.is_upcycling(loaded, config) and upcycle.is_router(key))
  )
  fresh_keys = [k for k in want if k not in flat and by_design(k)]
  if fresh_keys:
    fresh = traverse_util.flatten_dict(init_params(config, jax.random.key(0)) if fresh is None else fresh)
    flat.update({k: fresh[k] for k in fresh_keys})
  upcycled = " (upcycled: experts copy their layer's dense FFN)" if upcycle.is_upcycling(loaded, config) else ""
  for key in sorted(set(want) | set(flat)):
    got = getattr(flat.get(key), "shape", None)
    if got != getattr(want.get(key), "shape", None):
      raise ValueError(
        f"{path}: param {'/'.join(key)} has shape {got} but config.model implies "
        f"{getattr(want.get(key), 'shape', None)} (None = absent){upcycled}"
      )
  return traverse_util.unflatten_dict(flat)


def merge_adapters(adapters, meta, where):
  """A LoRA checkpoint's adapters merged into its base once (the base its config names, checked against the
  recorded hash): the plain params that predict, evaluate and `convert export-hf --merge` read."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from t5jax import lora
  from t5jax.model import T5Config

  config = ml_collections.ConfigDict(meta["config"])
  base = lora.build(config, T5Config.from_dict(meta["config"]["model"]), load_params_for)
  held = base.load_arg()
  lora.check_base(meta.get("lora_base"), base, where)
  merge = functools.partial(base.merge, matmul_dtype=jnp.float32)  # exports and inference read float32
  return jax.jit(merge)(held, jax.tree.map(jnp.asarray, adapters))

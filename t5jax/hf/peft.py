"""Hugging Face PEFT's LoRA adapters in and out: adapter_config.json + adapter_model.safetensors <-> our adapters.

PEFT wraps each targeted torch Linear (weight [out, in]) as `base_model.model.<module>.lora_A.weight` [r, in]
and `lora_B.weight` [out, r], and adds (lora_alpha / r) B A to it. Ours are A [*in, r] and B [r, *out] beside
the kernel [*in, *out] (t5jax/lora.py), so PEFT's A is ours flattened and transposed, and so is B. The module
names are transformers' T5 names, which `t5.param_map` pairs with our kernels. Only dense T5 adapters have a
PEFT form: transformers' T5 has no MoE experts or video front end.
"""

import json
import os

import numpy as np
from flax import traverse_util

from t5jax.hf.t5 import param_map
from t5jax.model import layer_stack

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_IN_DIMS = {"qkv": 1, "out": 2, "linear": 1}  # input axes of our kernel, by t5.param_map's layout kind


def _pairs(config):
  """(our kernel path, PEFT module name, input axes, kernel shape) of every kernel PEFT can adapt."""
  for path, name, kind, shape in param_map(config):
    if kind in _IN_DIMS and name.endswith(".weight") and path[-1] == "kernel" and path[0] != "lm_head":
      yield path, name.removesuffix(".weight"), _IN_DIMS[kind], tuple(shape)


def to_peft(adapters, config, lora, base_path):
  """Our adapters (any layer layout) -> ({PEFT tensor name: float32 array}, adapter_config dict); `lora`: the
  run's config.finetune.lora (rank, alpha, dropout)."""
  rank = lora.rank
  flat = layer_stack.unstack_flat_in_place(traverse_util.flatten_dict(adapters), config)
  tensors, modules = {}, set()
  for path, module, _, _ in _pairs(config):
    if path + ("lora_a",) not in flat:
      continue
    a, b = np.asarray(flat.pop(path + ("lora_a",)), np.float32), np.asarray(flat.pop(path + ("lora_b",)), np.float32)
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    modules.add(module.rsplit(".", 1)[1])
  if flat:
    raise ValueError(
      f"adapter {'/'.join(sorted(flat)[0])} has no PEFT form (transformers' T5 has no such Linear); "
      "export-hf --merge writes the model with it merged in"
    )
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "SEQ_2_SEQ_LM",
    "base_model_name_or_path": base_path,
    "r": rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": lora.dropout,
    "target_modules": sorted(modules),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
  }
  return tensors, adapter_config


def save_peft(adapters, config, lora, base_path, out_dir):
  """Writes adapter_config.json and adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
  from safetensors.numpy import save_file

  tensors, adapter_config = to_peft(adapters, config, lora, base_path)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(adapter_config, f, indent=2)
  save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})


def read_peft_config(peft_dir):
  """adapter_config.json of `peft_dir`, refusing what our LoRA does not compute (one-line errors)."""
  path = os.path.join(peft_dir, CONFIG)
  try:
    with open(path) as f:
      c = json.load(f)
  except OSError as e:
    raise FileNotFoundError(f"{path}: cannot read the adapter config ({e.strerror})") from None
  unsupported = {
    "peft_type": c.get("peft_type") != "LORA",
    "use_rslora": bool(c.get("use_rslora")),
    "use_dora": bool(c.get("use_dora")),
    "rank_pattern": bool(c.get("rank_pattern")),
    "alpha_pattern": bool(c.get("alpha_pattern")),
    "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
    "bias": c.get("bias", "none") != "none",
    "modules_to_save": bool(c.get("modules_to_save")),
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{path}: {key}={c.get(key)!r} is not plain LoRA, which is what t5jax imports")
  return c


def load_peft(peft_dir, config):
  """(adapters in `config`'s layer layout, the config.finetune.lora group they imply: rank, alpha, dropout and
  our target names) of a PEFT LoRA directory."""
  from safetensors.numpy import load_file

  c = read_peft_config(peft_dir)
  rank = int(c["r"])
  tensors = load_file(os.path.join(peft_dir, WEIGHTS))
  flat, targets = {}, set()
  for path, module, n_in, kernel in _pairs(config):
    name_a, name_b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
    if name_a not in tensors:
      continue
    a, b = tensors.pop(name_a).astype(np.float32), tensors.pop(name_b).astype(np.float32)
    flat[path + ("lora_a",)] = np.ascontiguousarray(a.T).reshape(*kernel[:n_in], rank)
    flat[path + ("lora_b",)] = np.ascontiguousarray(b.T).reshape(rank, *kernel[n_in:])
    short = module.rsplit(".", 1)[1]
    targets.add("wi" if short.startswith("wi") else short)
  if tensors or not flat:
    left = sorted(tensors)[0] if tensors else "no LoRA tensors"
    raise ValueError(f"{os.path.join(peft_dir, WEIGHTS)}: {left} matches no kernel of the base T5")
  if config.scan_layers:
    layer_stack.stack_flat_in_place(flat, config)
  group = dict(rank=rank, alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)))
  return traverse_util.unflatten_dict(flat), dict(group, targets=tuple(sorted(targets)))

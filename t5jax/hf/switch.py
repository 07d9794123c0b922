"""Switch Transformers checkpoints (transformers' `switch_transformers`): their config fields and FFN tensors.

hf.py reads and writes the tensors every T5 shares; this module adds what Switch does differently:
  {stack}.block.{i}.layer.{j}.mlp.{wi,wo}.weight: a dense FFN (T5 names it DenseReluDense)
  ....mlp.router.classifier.weight [experts, embed]  <-> mlp/router/kernel [embed, experts]
  ....mlp.experts.expert_{e}.wi.weight [mlp, embed]  <-> mlp/experts/wi [experts, embed, mlp], slice e
  ....mlp.experts.expert_{e}.wo.weight [embed, mlp]  <-> mlp/experts/wo [experts, mlp, embed], slice e
Rows for one expert's slice carry the path `(..., "experts", "wi", e)`; `stack_experts_in_place` and
`unstack_experts_in_place` turn those into the stacked leaf and back.

transformers' sparse layer is our HF-style MoE: top-1 token choice gated by the router probability, one
capacity group per sequence with tokens kept in position order (padding included), a dropped token's FFN output
zero. Its experts are always un-gated (T5DenseActDense), and we read `dense_act_fn='relu'` only.
"""

import dataclasses

import numpy as np

MODEL_TYPE = "switch_transformers"
# What an export writes as `expert_capacity` for a model trained with capacity factors (moe.expert_capacity=0):
# more slots than any sequence has tokens, so inference drops nothing (as our cached decoding step).
NO_DROP_CAPACITY = 1 << 20


def _hf_step(num_layers, num_sparse):
  """transformers' sparse step for `num_sparse_*_layers`: layer i is sparse if i % step == 1 (all if step == 1,
  none if 0), which is exactly our moe.every_*."""
  return num_layers // num_sparse if num_sparse > 0 else num_layers


def config_fields(hf, path):
  """T5Config fields (beyond T5's shared ones) from a Switch config.json dict; `path` names it in errors."""
  for key, want in (("router_bias", False), ("router_dtype", "float32"), ("dense_act_fn", "relu")):
    if hf.get(key, want) != want:
      raise ValueError(
        f"{path}: {key}={hf[key]!r} is not supported (t5jax reads Switch checkpoints with {key}={want!r})"
      )
  num_layers = hf.get("num_layers", 12)  # defaults are transformers' SwitchTransformersConfig's
  num_decoder_layers = hf.get("num_decoder_layers") or num_layers
  moe = dict(
    num_experts=hf.get("num_experts", 8),
    router="token_choice",
    top_k=1,
    every_encoder=_hf_step(num_layers, hf.get("num_sparse_encoder_layers", 3)),
    every_decoder=_hf_step(num_decoder_layers, hf.get("num_sparse_decoder_layers", 3)),
    expert_capacity=hf.get("expert_capacity", 64),
    jitter=hf.get("router_jitter_noise", 0.01),
    # transformers computes each loss once over all of a stack's sparse layers; we sum it per layer.
    balance_loss_weight=hf.get("router_aux_loss_coef", 0.001),
    z_loss_weight=hf.get("router_z_loss_coef", 0.001),
  )
  return dict(feed_forward_proj="relu", moe=moe)


def _num_sparse(config, stack):
  """The `num_sparse_{stack}_layers` that makes transformers place sparse layers where we do."""
  n = getattr(config, f"num_{stack}_layers")
  sparse_at = lambda c: {i for i in range(n) if c.is_sparse(stack, i)}  # noqa: E731
  ours = sparse_at(config)
  for num_sparse in range(1, n + 2):  # n + 1: a step of 0, transformers' only way to have no sparse layer
    moe = dataclasses.replace(config.moe, **{f"every_{stack}": _hf_step(n, num_sparse)})
    if sparse_at(dataclasses.replace(config, moe=moe)) == ours:
      return num_sparse
  raise ValueError(
    f"T5Config.moe.every_{stack}={getattr(config.moe, f'every_{stack}')} puts sparse layers at "
    f"{sorted(ours)} of {n}, which no Switch Transformers num_sparse_{stack}_layers reproduces"
  )


def check_exportable(config):
  """Raises a one-line ValueError naming the first setting transformers' Switch model cannot express."""
  for name, value, want in (
    ("moe.router", config.moe.router, "token_choice"),
    ("moe.top_k", config.moe.top_k, 1),
    ("feed_forward_proj", config.feed_forward_proj, "relu"),
  ):
    if value != want:
      raise ValueError(
        f"T5Config.{name}={value!r}: Switch Transformers checkpoints need "
        f"{name}={want!r}, so this model cannot be exported to Hugging Face"
      )


def config_dict_update(config):
  """The Switch-specific entries of config.json for an MoE T5Config (over hf.py's T5 entries)."""
  check_exportable(config)
  return {
    "architectures": ["SwitchTransformersForConditionalGeneration"],
    "model_type": MODEL_TYPE,
    "dense_act_fn": "relu",
    "num_experts": config.num_experts,
    "num_sparse_encoder_layers": _num_sparse(config, "encoder"),
    "num_sparse_decoder_layers": _num_sparse(config, "decoder"),
    "expert_capacity": config.moe.expert_capacity or NO_DROP_CAPACITY,
    "router_jitter_noise": config.moe.jitter,
    "router_bias": False,
    "router_dtype": "float32",
    "router_aux_loss_coef": config.moe.balance_loss_weight,
    "router_z_loss_coef": config.moe.z_loss_weight,
  }


def ffn_rows(config, sparse, ours, hf):
  """param_map rows of one layer's FFN: `ours` its path ending in 'mlp', `hf` e.g. 'encoder.block.1.layer.1'."""
  c = config
  if not sparse:
    return [
      (ours + ("wi", "kernel"), f"{hf}.mlp.wi.weight", "linear", (c.d_model, c.d_ff)),
      (ours + ("wo", "kernel"), f"{hf}.mlp.wo.weight", "linear", (c.d_ff, c.d_model)),
    ]
  rows = [(ours + ("router", "kernel"), f"{hf}.mlp.router.classifier.weight", "linear", (c.d_model, c.num_experts))]
  for e in range(c.num_experts):
    rows += [
      (ours + ("experts", "wi", e), f"{hf}.mlp.experts.expert_{e}.wi.weight", "linear", (c.d_model, c.d_ff)),
      (ours + ("experts", "wo", e), f"{hf}.mlp.experts.expert_{e}.wo.weight", "linear", (c.d_ff, c.d_model)),
    ]
  return rows


def add_untied_embeddings(tensors, config):
  """An untied Switch model in transformers ties nothing, not even the stacks' embed_tokens to `shared`, so an
  untied export writes them too (the same table: ours is one)."""
  if config.num_experts and not config.tie_word_embeddings:
    for stack in ("encoder", "decoder"):
      tensors[f"{stack}.embed_tokens.weight"] = tensors["shared.weight"]


def check_one_embedding(hf, tensors):
  """Ours is one table for both stacks; an untied Switch model in transformers has three (shared and each
  stack's embed_tokens). Raises a one-line ValueError when they differ; tied models' copies are skipped."""
  if hf.get("model_type") != MODEL_TYPE or hf.get("tie_word_embeddings", True):
    return
  shared = tensors.get("shared.weight")
  for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    if name in tensors.index and not np.array_equal(tensors.get(name), shared):
      raise ValueError(
        f"{tensors.file(name)}: tensor {name} differs from shared.weight; t5jax reads models "
        "whose stacks share one embedding table"
      )


def stack_experts_in_place(flat, config, stack):
  """Per-expert leaves `path + (e,)` -> one leaf `path` [experts, ...], built with `stack` (e.g. jnp.stack)."""
  for path in sorted({k[:-1] for k in flat if isinstance(k[-1], int)}):
    flat[path] = stack([flat.pop(path + (e,)) for e in range(config.num_experts)])
  return flat


def unstack_experts_in_place(flat, config):
  """The inverse of stack_experts_in_place for the sparse layers' expert kernels (numpy slices)."""
  for path in [k for k in flat if k[-3:-1] == ("mlp", "experts")]:
    stacked = np.asarray(flat.pop(path))
    for e in range(config.num_experts):
      flat[path + (e,)] = stacked[e]
  return flat

"""Mixture-of-experts FFN (Switch Transformer, GShard / ST-MoE): routers, capacity, aux losses, batched experts.

A sparse layer replaces T5's MLP: a float32 router scores each token against `num_experts` experts, each token
goes to at most `capacity` slots per expert within its group, the chosen experts' outputs are summed weighted
by their gates, and a token that no expert takes gets zero (the layer's residual connection carries it).

Groups (capacity is shared within one):
  T5X style (`moe.expert_capacity == 0`): the batch's tokens, flattened, in groups of `moe.group_size` (the
    largest divisor of batch * length not above it); capacity = ceil(factor * group * top_k / experts), with
    `moe.capacity_factor_train` in training (deterministic=False) and `moe.capacity_factor_eval` otherwise.
  Hugging Face style (`moe.expert_capacity > 0`): one group per sequence, capacity `moe.expert_capacity`,
    padding routed like any token (transformers' SwitchTransformers, so released checkpoints match).
  The decoder's cached step (decode=True) drops nothing: its groups hold one token per sequence.

What the train step collects (`model.apply(..., mutable=moe.COLLECTIONS)`, then `summarize`):
  moe_losses/.../aux_loss        per sparse layer: balance_weight * balance_loss + z_weight * z_loss
  moe_metrics/.../{balance_loss, z_loss, fraction_dropped, router_entropy} []  and  expert_load [experts]
Under `scan_layers` every leaf gains a leading axis of scanned blocks. Calls that do not make these collections
mutable (decoding, plain `apply`) record nothing.

Params of a sparse `mlp`: router/kernel [embed, experts] (replicated over experts), and experts/{wi | wi_0,
wi_1} [experts, embed, mlp], experts/wo [experts, mlp, embed]: the 'experts' axis is sharded over the mesh
axis `expert` by partitioning.AXIS_RULES. The tokens reach them by those annotations, or (`moe.expert_parallel=
'all_to_all'`) by GShard's two all-to-alls written out in shard_map; config.py says which is the default and why.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jax.sharding import PartitionSpec as P

from t5jax.model import partitioning
from t5jax.model.layers import ACTIVATIONS, DenseGeneral

MOE_LOSSES = "moe_losses"
MOE_METRICS = "moe_metrics"
COLLECTIONS = (MOE_LOSSES, MOE_METRICS)


class Routing(NamedTuple):
  """Each token's K choices, [groups, group_len, K] (K = top_k; for expert choice K = experts, choice e = e)."""

  expert: jax.Array  # int32 expert of each choice
  position: jax.Array  # int32 slot in that expert's buffer; == capacity when the choice is not processed
  gate: jax.Array  # float32 weight on the expert's output; 0 when not processed
  chosen: jax.Array  # bool: the router picked it (before capacity)
  logits: jax.Array  # [groups, group_len, experts] float32 router logits
  probs: jax.Array  # their softmax


def group_size(num_tokens, max_size):
  """The largest divisor of `num_tokens` not above `max_size` (groups must tile the tokens exactly)."""
  return max(d for d in range(1, min(num_tokens, max_size) + 1) if num_tokens % d == 0)


def expert_capacity(config, group_len, deterministic):
  """Slots per expert per group; never more than the group's tokens (an expert cannot take a token twice)."""
  if config.moe.expert_capacity:
    return min(config.moe.expert_capacity, group_len)
  factor = config.moe.capacity_factor_eval if deterministic else config.moe.capacity_factor_train
  k = config.moe.top_k if config.moe.router == "token_choice" else 1
  return min(max(1, math.ceil(factor * group_len * k / config.num_experts)), group_len)


def token_choice(logits, top_k, capacity):
  """Each token picks its top_k experts; [groups, group_len, experts] float32 logits -> Routing.

  top-1 (Switch) gates by the raw probability, which is how the router gets its gradient; top-k > 1 (GShard,
  ST-MoE) renormalizes the chosen probabilities to sum to 1. Slots go first to every token's first choice,
  then to second choices, each in position order (T5X; transformers' top-1 router is the k = 1 case).
  """
  num_groups, length, num_experts = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  gate, expert = jax.lax.top_k(probs, top_k)  # [g, s, k]
  if top_k > 1:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  onehot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)  # [g, s, k, e]
  by_priority = onehot.transpose(0, 2, 1, 3).reshape(num_groups, top_k * length, num_experts)
  slots = (jnp.cumsum(by_priority, axis=1) - 1).reshape(num_groups, top_k, length, num_experts)
  position = jnp.sum(slots.transpose(0, 2, 1, 3) * onehot, axis=-1)  # [g, s, k]
  kept = position < capacity
  return Routing(
    expert, jnp.where(kept, position, capacity), jnp.where(kept, gate, 0.0), jnp.ones_like(kept), logits, probs
  )


def expert_choice(logits, capacity):
  """Each expert picks its `capacity` highest-probability tokens of the group (Zhou et al. 2022); a token may
  get several experts or none. Not causal: a token's fate depends on later tokens, hence encoder only."""
  num_groups, length, num_experts = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  _, token = jax.lax.top_k(probs.transpose(0, 2, 1), capacity)  # [g, e, c]
  picked = jax.nn.one_hot(token, length, dtype=jnp.int32)  # [g, e, c, s]
  kept = jnp.any(picked > 0, axis=2).transpose(0, 2, 1)  # [g, s, e]
  position = jnp.argmax(picked, axis=2).transpose(0, 2, 1)
  expert = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), kept.shape)
  return Routing(expert, jnp.where(kept, position, capacity), jnp.where(kept, probs, 0.0), kept, logits, probs)


def load_balancing_loss(routing):
  """Switch's eq. 4 per group, averaged over groups: experts * sum_e f_e * P_e, where f_e is the fraction of the
  group's tokens whose choices include e (before capacity) and P_e the mean router probability of e.
  1 when top-1 routing is uniform (top_k when top-k is)."""
  num_experts = routing.probs.shape[-1]
  picked = jax.nn.one_hot(routing.expert, num_experts) * routing.chosen[..., None]
  fraction = jnp.mean(jnp.max(picked, axis=2), axis=1)  # [g, e]
  return num_experts * jnp.mean(jnp.sum(fraction * jnp.mean(routing.probs, axis=1), axis=-1))


def router_z_loss(logits):
  """ST-MoE's z-loss: the mean over tokens of logsumexp(logits)**2, keeping router logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def routing_metrics(routing, capacity, expert_choice_router):
  """{fraction_dropped, expert_load [experts], router_entropy}.

  fraction_dropped: of the router's choices, the share over capacity (token choice); with expert choice, the
  share of tokens no expert took. expert_load: each expert's share of the router's choices (sums to 1).
  """
  kept = routing.position < capacity
  # The mean of the dropped indicator, not 1 - mean(kept): rounding must not report -1e-8 dropped.
  missed = ~jnp.any(kept, axis=-1) if expert_choice_router else ~kept
  dropped = jnp.mean(missed.astype(jnp.float32))
  counts = jnp.sum(jax.nn.one_hot(routing.expert, routing.probs.shape[-1]) * routing.chosen[..., None], axis=(0, 1, 2))
  entropy = -jnp.sum(routing.probs * jnp.log(jnp.maximum(routing.probs, 1e-30)), axis=-1)
  return dict(fraction_dropped=dropped, expert_load=counts / jnp.sum(counts), router_entropy=jnp.mean(entropy))


def summarize(mutated):
  """apply's mutated collections -> (aux loss summed over sparse layers, {metric: mean over sparse layers}).

  Either collection may be missing (a dense model gives 0.0 and {}). expert_load stays per expert.
  """
  losses = jax.tree.leaves(mutated.get(MOE_LOSSES, {}))
  aux = sum(jnp.sum(x) for x in losses) if losses else jnp.zeros((), jnp.float32)
  by_name = {}
  for path, values in traverse_util.flatten_dict(dict(mutated.get(MOE_METRICS, {}))).items():
    by_name.setdefault(path[-1], []).extend(values)
  metrics = {}
  for name, values in by_name.items():
    if name == "expert_load":
      metrics[name] = jnp.mean(jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in values]), axis=0)
    else:
      metrics[name] = jnp.mean(jnp.concatenate([jnp.ravel(v) for v in values]))
  return aux, metrics


class Experts(nn.Module):
  """The kernels of `num_experts` T5 MLPs, stacked on 'experts': {wi | wi_0, wi_1} [experts, embed, mlp] and
  wo [experts, mlp, embed], cast to `dtype`. `expert_mlp` runs them (so shard_map can take them as inputs)."""

  num_experts: int
  d_model: int
  d_ff: int
  feed_forward_proj: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    def kernel(name, shape, axes, std):
      w = self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(std), axes), (self.num_experts,) + shape, jnp.float32
      )
      return w.astype(self.dtype)

    ins = ("wi_0", "wi_1") if self.feed_forward_proj.startswith("gated-") else ("wi",)
    kernels = {
      name: kernel(name, (self.d_model, self.d_ff), ("experts", "embed", "mlp"), self.d_model**-0.5) for name in ins
    }
    kernels["wo"] = kernel("wo", (self.d_ff, self.d_model), ("experts", "mlp", "embed"), self.d_ff**-0.5)
    return kernels


def expert_mlp(x, kernels, feed_forward_proj, dropout_rate=0.0, dropout_key=None, group_sizes=None):
  """The experts' MLPs (relu or gated, as `feed_forward_proj`); dropout on the hidden units when a key is given.

  Einsum form: [experts, ..., embed] -> [experts, ..., embed]. Ragged form (`group_sizes` [experts] given):
  [tokens, embed] sorted by expert -> [tokens, embed], through jax.lax.ragged_dot.
  """
  if group_sizes is None:
    matmul = lambda a, w: jnp.einsum("e...m,emf->e...f", a, w)
  else:
    matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
  x = x.astype(kernels["wo"].dtype)
  act = ACTIVATIONS[feed_forward_proj.removeprefix("gated-")]
  if feed_forward_proj.startswith("gated-"):
    h = act(matmul(x, kernels["wi_0"])) * matmul(x, kernels["wi_1"])
  else:
    h = act(matmul(x, kernels["wi"]))
  if dropout_key is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, h.shape)
    h = jnp.where(keep, h / (1.0 - dropout_rate), 0).astype(h.dtype)
  return matmul(h, kernels["wo"])


def _dispatch_einsum(tokens, routing, num_experts, capacity, run_experts):
  """T5X's dispatch: one-hot [groups, group_len, experts, capacity] masks gather each expert's slots, and the
  weighted outputs scatter back. tokens [g, s, embed]; routing's expert, position, gate [g, s, k];
  run_experts [experts, g, capacity, embed] -> same. Returns [g, s, embed]."""
  expert_1h = jax.nn.one_hot(routing.expert, num_experts, dtype=tokens.dtype)  # [g, s, k, e]
  slot_1h = jax.nn.one_hot(routing.position, capacity, dtype=tokens.dtype)  # [g, s, k, c]; dropped: zeros
  dispatch = jnp.einsum("gske,gskc->gsec", expert_1h, slot_1h)
  combine = jnp.einsum("gske,gskc,gsk->gsec", expert_1h, slot_1h, routing.gate.astype(tokens.dtype))
  outputs = run_experts(jnp.einsum("gsec,gsm->egcm", dispatch, tokens))  # [e, g, c, embed]
  return jnp.einsum("gsec,egcm->gsm", combine, outputs)


def _dispatch_all_to_all(tokens, routing, capacity, kernels, dropout_key, config, mesh):
  """GShard's expert parallelism, written out in shard_map: the routing groups are split over the batch axes
  and the `expert` axis, each device builds its groups' [experts, groups, capacity, embed] buffer, one
  all_to_all sends every expert's slots to the device holding that expert, the local experts run, and a second
  all_to_all brings the results home for the combine. With the mlp split over `tensor` as well (Megatron
  inside each expert), the partial outputs are summed over it. The experts' embed dimension is gathered on
  entry (fsdp). tokens [g, s, embed] -> [g, s, embed]; the groups must divide over data x fsdp x expert.
  """
  num_experts = routing.probs.shape[-1]
  shards = math.prod(mesh.shape[a] for a in partitioning.EXPERT_GROUP_AXES)
  if tokens.shape[0] % shards:
    raise ValueError(
      f"T5Config.moe.expert_parallel='all_to_all' splits the {tokens.shape[0]} routing groups of "
      f"{tokens.shape[1]} tokens over data x fsdp x expert = {shards} devices; make the batch or "
      f"moe.group_size fit"
    )

  def body(tokens, expert, position, gate, kernels, key):
    if key is not None:  # a different dropout mask on each device
      for axis in mesh.axis_names:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))

    def exchange(inputs):  # [e, g, c, m]
      local = jax.lax.all_to_all(inputs, partitioning.EXPERT_AXIS, 0, 1, tiled=True)  # [e / n, n * g, c, m]
      out = expert_mlp(local, kernels, config.feed_forward_proj, config.dropout_rate, key)
      out = jax.lax.psum(out, partitioning.TENSOR_AXIS)
      return jax.lax.all_to_all(out, partitioning.EXPERT_AXIS, 1, 0, tiled=True)

    local_routing = routing._replace(expert=expert, position=position, gate=gate)
    return _dispatch_einsum(tokens, local_routing, num_experts, capacity, exchange)

  groups = P(partitioning.EXPERT_GROUP_AXES)
  kernel_specs = {
    k: partitioning.logical_spec(("experts", "mlp", None) if k == "wo" else ("experts", None, "mlp")) for k in kernels
  }
  # Everything crossing in or out is pinned to the block boundaries' layout (groups over the batch axes only):
  # else XLA carries the split over `expert` into the router and the attention layers around, mostly in the
  # backward pass, and gathers their activations back (the TPU plan of the tiny config showed ~60-100 MiB of
  # all-gathers per step). Entering is then a local slice; leaving, one all-gather.
  inputs = [
    nn.with_logical_constraint(x, ("batch", "length", None))
    for x in (tokens, routing.expert, routing.position, routing.gate)
  ]
  out = jax.shard_map(body, mesh=mesh, in_specs=(groups,) * 4 + (kernel_specs, P()), out_specs=groups)(
    *inputs, kernels, dropout_key
  )
  return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def _dispatch_ragged(tokens, routing, mlp):
  """MaxText's grouped matmul: every choice's token, sorted by expert, through ragged_dot; choices over capacity
  are computed and weighted 0. Token choice only. tokens [g, s, embed] -> [g, s, embed].

  Not the default: XLA:CPU lowers ragged_dot to a dense dot against every expert, several times slower than
  the einsum dispatch (benchmarks/README.md, "Mixture of experts step"); measure again where a grouped matmul is
  native (TPU, GPU).
  """
  num_groups, length, d_model = tokens.shape
  top_k, num_experts = routing.expert.shape[-1], routing.probs.shape[-1]
  flat_expert = routing.expert.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  token = order // top_k  # into the g * s tokens
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  outputs = mlp(tokens.reshape(-1, d_model)[token], group_sizes)
  weighted = outputs * routing.gate.reshape(-1)[order, None].astype(outputs.dtype)
  out = jnp.zeros((num_groups * length, d_model), outputs.dtype).at[token].add(weighted)
  return out.reshape(num_groups, length, d_model)


class MoeMLP(nn.Module):
  """The sparse FFN. [batch, length, embed] -> [batch, length, embed]; sows its aux loss and metrics."""

  config: Any  # T5Config (not imported: config.py stays free of model code)

  @nn.compact
  def __call__(self, x, deterministic=True, decode=False):
    """`decode`: the decoder's cached step, where nothing is dropped (see below)."""
    cfg = self.config
    batch, length, d_model = x.shape
    size = length if cfg.moe.expert_capacity else group_size(batch * length, cfg.moe.group_size)
    tokens = x.reshape(-1, size, d_model)  # [groups, size, embed]
    router_in = tokens.astype(jnp.float32)  # routing decisions are brittle in bf16 (Switch, "selective precision")
    if cfg.moe.jitter and not deterministic:
      router_in = router_in * jax.random.uniform(
        self.make_rng("dropout"), router_in.shape, jnp.float32, 1.0 - cfg.moe.jitter, 1.0 + cfg.moe.jitter
      )
    logits = DenseGeneral(cfg.num_experts, ("embed", "unmodeled"), d_model**-0.5, dtype=jnp.float32, name="router")(
      router_in
    )
    # A cached decoding step routes one token per sequence: capacity sized for its tiny group would drop
    # tokens that the full forward keeps, so every token fits (transformers' generate() never drops either).
    capacity = size if decode else expert_capacity(cfg, size, deterministic)
    ec = cfg.moe.router == "expert_choice"
    routing = expert_choice(logits, capacity) if ec else token_choice(logits, cfg.moe.top_k, capacity)
    out = self._dispatch(tokens, routing, capacity, deterministic, decode)
    # Expert choice balances load by construction: no balancing loss.
    balance = jnp.zeros((), jnp.float32) if ec else load_balancing_loss(routing)
    z_loss = router_z_loss(logits)
    self.sow(MOE_LOSSES, "aux_loss", cfg.moe.balance_loss_weight * balance + cfg.moe.z_loss_weight * z_loss)
    for name, value in dict(balance_loss=balance, z_loss=z_loss, **routing_metrics(routing, capacity, ec)).items():
      self.sow(MOE_METRICS, name, value)
    return out.reshape(batch, length, d_model).astype(cfg.compute_dtype)

  def _dispatch(self, tokens, routing, capacity, deterministic, decode):
    """tokens [groups, size, embed] through their chosen experts, by the configured dispatch -> same shape."""
    cfg = self.config
    kernels = Experts(
      cfg.num_experts, tokens.shape[-1], cfg.d_ff, cfg.feed_forward_proj, cfg.compute_dtype, name="experts"
    )()
    key = self.make_rng("dropout") if cfg.dropout_rate and not deterministic else None
    mlp = lambda x, group_sizes=None: expert_mlp(x, kernels, cfg.feed_forward_proj, cfg.dropout_rate, key, group_sizes)
    if cfg.moe.dispatch == "ragged":
      return _dispatch_ragged(tokens, routing, mlp)
    # A decoding step's groups (one token per sequence), like init's dummy batch, seldom divide over the devices;
    # they go by annotation (same outputs).
    exchange = cfg.moe.expert_parallel == "all_to_all" and not (decode or self.is_initializing())
    mesh = partitioning.expert_parallel_mesh() if exchange else None
    if mesh is not None:
      return _dispatch_all_to_all(tokens, routing, capacity, kernels, key, cfg, mesh)
    constrain = lambda x: nn.with_logical_constraint(x, ("experts", "batch", "length", "embed"))
    return _dispatch_einsum(tokens, routing, cfg.num_experts, capacity, lambda x: mlp(constrain(x)))

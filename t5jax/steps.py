"""The jitted computations of training: one optimizer step over a global batch, and one eval batch."""

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from t5jax import losses
from t5jax.model import init_params, moe


class LossTerm(Protocol):
  """An extra term of the train step's loss with an extra argument of the step (seams.LOSS_TERMS lists them).
  The argument comes after (state, batch) and is never differentiated: the gradient is the model's only."""

  abstract_arg: Any  # the argument, abstract (ShapeDtypeStructs with their shardings)
  sharding: Any  # its shardings, a pytree like it

  def add_loss(self, m, logits, batch, arg):
    """Summed metrics `m` of the label loss (losses.loss_sums) -> summed metrics with the term mixed in."""

  def batch_features(self, config, rows):
    """{feature: (shape, dtype)} the term reads beyond the input kind's (usually none)."""

  def data_options(self):
    """Keyword arguments of `pipeline.from_config` that produce those features."""

  def check_data(self, data):
    """Raises a one-line error if the run's data does not suit the term."""

  def load_arg(self):
    """The argument's host value (a checkpoint's params, say), read once when training starts."""


def make_init_state(model_config, tx, init=None):
  """rng -> the fresh train state {params, opt_state, step, rng}; jit it with out_shardings to create it
  already sharded, or `jax.eval_shape` it for the abstract state. `init`: rng -> the trained params (default:
  the model's; a LoRA run's adapters)."""

  def init_state(rng):
    params_rng, rng = jax.random.split(rng)
    params = (init or (lambda key: init_params(model_config, key)))(params_rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": rng}

  return init_state


def make_grad_fn(model, config, data_axes=None, terms=(), lora=None):
  """(params, batch, rng, *args) -> (gradient of the loss per target token, summed metrics).

  The one loss normalization of the project: every microbatch and device sums its loss and tokens, and the
  summed gradient is divided once by the global batch's token count (or by T5's constant
  `config.loss.normalizer`). `data_axes`: the mesh axes a per-device batch is split over (pmap mode), whose
  sums are all-reduced here by hand. `terms`: extra loss terms (LossTerm), each with its argument in `args`.
  `lora`: a lora.FrozenBase; `params` are then its adapters, and the frozen base is the first of `args`.
  """
  deterministic = config.model.dropout_rate == 0.0

  def summed_loss(params, batch, rng, args):
    variables = {"params": params}
    if lora is not None:  # only the adapters are differentiated: the base is an argument
      variables, args = lora.train_variables(args[0], params), args[1:]
    inputs, kwargs = model.batch_inputs(batch)
    logits, mutated = model.apply(
      variables, *inputs, deterministic=deterministic, rngs={"dropout": rng}, mutable=moe.COLLECTIONS, **kwargs
    )
    m = losses.loss_sums(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      z_loss=config.loss.z_loss,
      label_smoothing=config.loss.label_smoothing,
    )
    for term, arg in zip(terms, args, strict=True):
      m = term.add_loss(m, logits, batch, jax.lax.stop_gradient(arg))
    if model.config.num_experts:
      m = with_router_losses(m, *moe.summarize(mutated))
    return m["loss_sum"], m

  summed_grad = jax.grad(summed_loss, has_aux=True)

  def grad_fn(params, batch, rng, *args):
    k = config.grad_accum_steps
    if k == 1:
      grads, m = summed_grad(params, batch, rng, args)
    else:
      # Gradient accumulation: scan over k microbatches so activations live for one microbatch at a time.
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        micro_grads = summed_grad(params, mb, jax.random.fold_in(rng, i), args)
        return jax.tree.map(jnp.add, carry, micro_grads), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(summed_grad, params, batch, rng, args))
      (grads, m), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    if data_axes:
      grads, m = jax.lax.psum((grads, m), data_axes)  # the all-reduce that pmap-style training makes by hand
    normalizer = config.loss.normalizer
    denominator = m["num_tokens"] if normalizer is None else jnp.float32(normalizer)
    return jax.tree.map(lambda g: g / jnp.maximum(denominator, 1.0), grads), m

  return grad_fn


def with_router_losses(m, aux, router_metrics):
  """Adds the MoE aux losses (load balance + router z-loss, per-token means) to the summed loss, and the router
  metrics as `moe_*_sum`. Scaled by the tokens they average over, they add across microbatches and devices
  like the loss does, and the one normalization (or `losses.summarize`) turns them back into means."""
  n = m["num_tokens"]
  return dict(
    m,
    loss_sum=m["loss_sum"] + aux * n,
    moe_aux_loss_sum=aux * n,
    **{f"moe_{name}_sum": value * n for name, value in router_metrics.items()},
  )


def make_train_step(model, tx, schedule, config, data_axes=None, terms=(), lora=None):
  """The update for one batch: (state, batch, *args) -> (new state, summed metrics + grad_norm, lr).

  Under `jax.jit` with sharded inputs (data_axes=None) the batch is the global batch and XLA inserts the
  cross-device reductions the shardings imply. For the pmap-style mode the step runs per device inside
  `jax.shard_map` (see `parallel.data_parallel`); `data_axes` then names the mesh axes the batch is split
  over, and each device folds its index into the dropout rng. `terms`, `lora` and `args`: see `make_grad_fn`.
  """
  grad_fn = make_grad_fn(model, config, data_axes, terms, lora)

  def train_step(state, batch, *args):
    rng = jax.random.fold_in(state["rng"], state["step"])
    if data_axes:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(data_axes))  # each device its own dropout
    grads, m = grad_fn(state["params"], batch, rng, *args)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "rng": state["rng"],
    }
    return new_state, dict(m, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))

  return train_step


def make_eval_step(model, config):
  """(params, batch) -> summed metrics of the batch, as the train step sums them (without dropout)."""

  def eval_step(params, batch):
    args, kwargs = model.batch_inputs(batch)
    logits = model.apply({"params": params}, *args, **kwargs)
    return losses.loss_sums(
      logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss=config.loss.z_loss
    )

  return eval_step

"""The jitted computations of training: one optimizer step over a global batch, and one eval batch."""

import jax
import jax.numpy as jnp
import optax

from t5jax import losses
from t5jax.model import init_params

# Features of packed batches (several examples per row): segment ids keep attention within an example and
# positions restart per example. Passed to the model only when the batch has them.
PACKED_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


def model_inputs(batch):
  """(args, kwargs) of `T5.__call__` for a batch with T5X feature names."""
  kwargs = {k: batch[k] for k in PACKED_FEATURES if k in batch}
  return (batch["encoder_input_tokens"], batch["decoder_input_tokens"]), kwargs


def make_init_state(model_config, tx):
  """rng -> the fresh train state {params, opt_state, step, rng}; jit it with out_shardings to create it
  already sharded."""
  def init_state(rng):
    params_rng, rng = jax.random.split(rng)
    params = init_params(model_config, params_rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": rng}
  return init_state


def make_train_step(model, tx, schedule, config, data_axes=None):
  """The update for one batch: microbatched gradients, one optimizer step, summed metrics.

  Under `jax.jit` with sharded inputs (data_axes=None) the batch is the global batch and XLA inserts the
  cross-device reductions the shardings imply. For the pmap-style mode the step runs per device inside
  `jax.shard_map`; `data_axes` then names the mesh axes the batch is split over, and the gradients and
  metrics are summed across them explicitly, before the update, so every device applies the same update.
  """
  deterministic = config.model.dropout_rate == 0.0
  normalizer = config.loss.normalizer or None

  def summed_loss(params, batch, rng):
    args, kwargs = model_inputs(batch)
    logits = model.apply({"params": params}, *args, deterministic=deterministic, rngs={"dropout": rng},
                         **kwargs)
    _, m = losses.loss_and_metrics(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
        z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing)
    return m["loss_sum"], m

  grad_fn = jax.grad(summed_loss, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    if data_axes:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(data_axes))  # each device its own dropout
    k = config.grad_accum_steps
    if k == 1:
      grads, m = grad_fn(state["params"], batch, rng)
    else:
      # Gradient accumulation: scan over k microbatches so activations live for one microbatch at a time.
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        g, mm = grad_fn(state["params"], mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, mm)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state["params"], batch, rng))
      (grads, m), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    if data_axes:
      grads, m = jax.lax.psum((grads, m), data_axes)  # the all-reduce that pmap-style training makes by hand
    # Gradients of the summed loss, divided once by the global batch's token count (or T5's constant).
    denominator = m["num_tokens"] if normalizer is None else jnp.float32(normalizer)
    grads = jax.tree.map(lambda g: g / jnp.maximum(denominator, 1.0), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
        "step": state["step"] + 1, "rng": state["rng"]}
    m = dict(m, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return new_state, m

  return train_step


def make_eval_step(model, config):
  def eval_step(params, batch):
    args, kwargs = model_inputs(batch)
    logits = model.apply({"params": params}, *args, **kwargs)
    _, m = losses.loss_and_metrics(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss=config.loss.z_loss)
    return m
  return eval_step

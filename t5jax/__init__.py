"""t5jax: a functional JAX/Flax T5 for research. `from_pretrained` loads any T5 checkpoint we can read.

model, params, config = t5jax.from_pretrained(path)
logits = model.apply({"params": params}, input_ids, decoder_input_ids, attention_mask=mask)
"""

from t5jax.planning import platforms

platforms.cpu_unless_accelerator()

from t5jax.loading import from_pretrained, load_checkpoint, load_params_for  # noqa: E402  (after the platform)

__all__ = ["from_pretrained", "load_checkpoint", "load_params_for"]

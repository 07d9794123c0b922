"""t5jax: a functional JAX/Flax T5 for research."""

"""t5jax data: tokenizer, span corruption, sources and the batch pipeline (no JAX devices here)."""

"""Hugging Face checkpoints in and out: T5, mT5, T5 v1.1 and Flan-T5 (`t5`), and Switch Transformers, whose MoE
config and expert tensors `switch` maps. `t5jax.load_checkpoint` and `t5jax.convert` use them."""

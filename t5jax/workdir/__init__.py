"""A run's directory: what it records (`record`: config.json and the tokenizer), its checkpoints (`checkpoint`),
the one trainer that holds it (`run_lock`), and what a resumed run may change (`resume`). Its files go through
`t5jax.storage`, a local path and a gs:// URL alike."""

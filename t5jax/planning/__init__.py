"""Planning a run for hardware you may not have: the TPU compiler's figures for a topology (`topology`), an
analytic estimate for GPUs, a roofline step time from the compiled program (`roofline`), and a search over
meshes and settings (`search`). The CLI is `t5jax.plan`."""

"""Planning a run for hardware you may not have: the TPU compiler's figures for a topology (`topology`), an
analytic estimate for GPUs, a roofline step time from the compiled program (`roofline`), a search over meshes
and settings (`search`), and which JAX platform a process uses (`platforms`). The CLI is `t5jax.plan`."""

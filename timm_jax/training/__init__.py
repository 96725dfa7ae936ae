"""Training machinery around the network: jitted steps (:mod:`~timm_jax.training.steps`), the
epoch loop (:mod:`~timm_jax.training.loop`), the run directory with its checkpoints
(:mod:`~timm_jax.training.rundir`), sliding-window inference
(:mod:`~timm_jax.training.inference`) and case-level metrics (:mod:`~timm_jax.training.metrics`)."""

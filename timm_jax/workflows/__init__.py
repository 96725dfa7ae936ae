"""What the scripts call: train a run (:mod:`~timm_jax.workflows.train`), fuse runs
(:mod:`~timm_jax.workflows.fuse`), evaluate a run (:mod:`~timm_jax.workflows.evaluate`), and the
figures and Markdown of reports (:mod:`~timm_jax.workflows.report`)."""

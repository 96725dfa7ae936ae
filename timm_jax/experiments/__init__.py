"""Experiments built on the package, outside its core: the demo data set
(:mod:`~timm_jax.experiments.demo_data`), its presets (:mod:`~timm_jax.experiments.presets`) and the
``make demo`` pipeline (:mod:`~timm_jax.experiments.demo`, :mod:`~timm_jax.experiments.demo_report`)."""

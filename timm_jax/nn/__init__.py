"""The network: the 3D U-Net (:mod:`~timm_jax.nn.unet`), its pure-JAX operations
(:mod:`~timm_jax.nn.ops`) and, fenced off beside them, the optional C++ CPU kernels
(:mod:`~timm_jax.nn.cpu_kernels`, sources in ``csrc/``)."""

"""deepscale_jax: training very deep transformers stably in JAX/Flax.

Signal-propagation theory, init and residual-scaling schemes, one block library for LM, MLM,
seq2seq and ViT models, and one sharded training loop. See README.md and shared/DESIGN.md.
"""

__version__ = "0.1.0"

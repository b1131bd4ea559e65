"""rlver_jax: RLVER (reinforcement learning with verifiable emotion rewards) in JAX."""

__version__ = "0.1.0"

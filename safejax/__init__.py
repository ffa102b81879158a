"""safejax: Safe RLHF (PPO-Lagrangian over learned reward and cost models) natively in JAX."""

__version__ = "0.1.0"

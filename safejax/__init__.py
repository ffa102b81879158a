"""safejax: Safe RLHF (PPO-Lagrangian over learned reward and cost models) natively in JAX.

Docstrings cite the algorithm by section, ``ALGORITHM.md §N``: that is ``experiments/ALGORITHM.md`` in the
repository, the project's account of Safe RLHF (equations, the reference's defaults, known pitfalls).
"""

__version__ = "0.1.0"

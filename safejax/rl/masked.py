"""Masked reductions used by every RL loss (per-sequence means, then a batch mean)."""

from __future__ import annotations

import jax.numpy as jnp

from safejax.rl._util import check_ndim, float_dtype


def masked_sum(x, mask):
    """Per-sequence masked sum.

    Args:
      x: ``[B, T]`` values (any float dtype).
      mask: ``[B, T]`` bool/int, 1 where the position counts. Broadcastable to ``x``.
    Returns:
      ``[B]`` ``sum_t mask * x`` (positions with mask 0 are ignored even if ``x`` is inf/NaN there).
    """
    x = jnp.asarray(x)
    dtype = float_dtype(x)
    m = jnp.broadcast_to(jnp.asarray(mask) != 0, x.shape)
    return jnp.sum(jnp.where(m, x.astype(dtype), 0), axis=-1)


def masked_mean(x, mask):
    """Masked mean as in the reference (since 2023-12): per-sequence mean, then the mean over the batch.

    ``mean_b [ sum_t m[b,t] * x[b,t] / max(sum_t m[b,t], 1) ]``. A row whose mask is all zero contributes 0
    (and still counts in the batch mean of B rows).

    Args:
      x: ``[B, T]`` values.
      mask: ``[B, T]`` bool/int, 1 where the position counts.
    Returns:
      scalar, float32 (float64 if ``x`` is float64).
    """
    x = jnp.asarray(x)
    check_ndim("masked_mean", "x", x, (2,))
    m = jnp.broadcast_to(jnp.asarray(mask) != 0, x.shape)
    dtype = float_dtype(x)
    count = jnp.maximum(jnp.sum(m, axis=-1).astype(dtype), 1.0)
    per_seq = masked_sum(x, m) / count
    return jnp.mean(per_seq)

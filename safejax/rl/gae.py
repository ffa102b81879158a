"""Generalised advantage estimation exactly as the reference ``get_advantages_and_returns``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_same_shape, float_dtype


def gae(values, rewards, mask, *, gamma=1.0, lam=0.95):
    """GAE over the response slice of the shifted arrays.

    The caller has already sliced the shifted arrays to the response actions ``[start:]`` with
    ``start = S - 1`` (ALGORITHM.md §5.1). Following the reference: ``r`` and ``V`` are zeroed wherever
    ``mask == 0``; then, backwards over ``t = T-1 .. 0``::

        delta_t = r_t + gamma * V_{t+1} * [t < T-1] - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}          (A_T = 0)
        G_t     = A_t + V_t                                (V already masked)

    so padded tail positions get ``A = G = 0`` and the state after the last token bootstraps from 0.

    Args:
      values: ``[..., T]`` old critic values ``V[t]`` (leading dims are batch dims, usually ``[B, T]``).
      rewards: ``[..., T]`` per-token rewards (or costs) from :func:`kl_shaped_rewards`.
      mask: ``[..., T]`` bool/int response mask (shifted, ``m[t] = mask[t+1]``).
      gamma: discount (reference: 1.0, hard-coded).
      lam: GAE lambda (reference: 0.95, hard-coded).
    Returns:
      ``(advantages [..., T], returns [..., T])``, both wrapped in ``stop_gradient`` (they are constants),
      float32 (float64 when the inputs are).
    """
    check_same_shape("gae", values=values, rewards=rewards, mask=mask)
    dtype = float_dtype(values, rewards)
    m = jnp.asarray(mask) != 0
    v = jnp.where(m, jnp.asarray(values).astype(dtype), 0)
    r = jnp.where(m, jnp.asarray(rewards).astype(dtype), 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)
    next_v = jnp.concatenate([v[..., 1:], jnp.zeros_like(v[..., :1])], axis=-1)
    delta = r + gamma * next_v - v

    def step(carry, d):
        a = d + gamma * lam * carry
        return a, a

    _, adv_t = jax.lax.scan(step, jnp.zeros(delta.shape[:-1], dtype), jnp.moveaxis(delta, -1, 0), reverse=True)
    advantages = jnp.moveaxis(adv_t, 0, -1)
    returns = advantages + v
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)

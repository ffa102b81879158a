"""PPO / PPO-Lagrangian per-token signals and losses (ALGORITHM.md §5.3, §5.5, §5.6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_ndim, check_same_shape, end_index, float_dtype
from safejax.rl.masked import masked_mean


def _end_onehot(mask):
    """``[B, T]`` float-able bool: True only at the last index with mask 1 (nowhere for an all-zero row)."""
    m = jnp.asarray(mask) != 0
    t = jnp.arange(m.shape[-1])
    e = end_index(m)
    return (t == e[..., None]) & jnp.any(m, axis=-1, keepdims=True)


def kl_shaped_rewards(reward, cost, log_probs, ref_log_probs, mask, *, kl_coeff, clip_range_score):
    """Per-token reward and cost with the KL penalty, as the reference ``add_kl_divergence_regularization``.

    With ``k_t = log_probs[t] - ref_log_probs[t]`` and ``e`` = last index with ``mask == 1``::

        r_t = clip(-kl_coeff * k_t + reward * 1[t = e], -clip_range_score, clip_range_score)
        c_t = clip(+kl_coeff * k_t + cost   * 1[t = e], -clip_range_score, clip_range_score)

    The KL enters the cost with a **plus** sign, so in ``(A_r - lambda*A_c)/(1+lambda)`` the KL coefficient stays
    exactly ``kl_coeff``. The clip applies to each per-token total. Positions with ``mask == 0`` keep their
    (clipped) KL term as in the reference; :func:`gae` and the masked means zero them. A row whose mask is all
    zero gets no end score.

    Args:
      reward: ``[B]`` reward-model end scores R.
      cost: ``[B]`` cost-model end scores C, ``[K, B]`` for K constraints, or ``None`` (plain PPO / shaping).
      log_probs: ``[B, T]`` old actor log-probs on the response slice.
      ref_log_probs: ``[B, T]`` reference-model log-probs on the same slice.
      mask: ``[B, T]`` response mask.
      kl_coeff: beta.
      clip_range_score: per-token clip bound (reference: 50).
    Returns:
      ``(rewards [B, T], costs [B, T] | [K, B, T] | None)``, constants (``stop_gradient``).
    """
    check_ndim("kl_shaped_rewards", "log_probs", log_probs, (2,))
    check_same_shape("kl_shaped_rewards", log_probs=log_probs, ref_log_probs=ref_log_probs, mask=mask)
    b = jnp.shape(log_probs)[0]
    if tuple(jnp.shape(reward)) != (b,):
        raise ValueError(f"safejax.rl.kl_shaped_rewards: reward must have shape [{b}], got {list(jnp.shape(reward))}")
    if cost is not None and (jnp.ndim(cost) not in (1, 2) or tuple(jnp.shape(cost)[-1:]) != (b,)):
        raise ValueError(
            f"safejax.rl.kl_shaped_rewards: cost must have shape [{b}] or [K, {b}], got {list(jnp.shape(cost))}")
    dtype = float_dtype(reward, cost, log_probs, ref_log_probs)
    kl = jnp.asarray(log_probs).astype(dtype) - jnp.asarray(ref_log_probs).astype(dtype)
    kl_term = jnp.asarray(kl_coeff, dtype) * kl
    clip = jnp.asarray(clip_range_score, dtype)
    onehot = _end_onehot(mask).astype(dtype)
    rewards = jnp.clip(-kl_term + jnp.asarray(reward).astype(dtype)[:, None] * onehot, -clip, clip)
    costs = None
    if cost is not None:
        costs = jnp.clip(kl_term + jnp.asarray(cost).astype(dtype)[..., None] * onehot, -clip, clip)
        costs = jax.lax.stop_gradient(costs)
    return jax.lax.stop_gradient(rewards), costs


def reward_shaping(reward, cost, *, nu):
    """Reward-shaping baseline signal ``reward - nu * cost`` (fixed nu, no ``1/(1+nu)`` factor).

    Args:
      reward: ``[B]`` end rewards. cost: ``[B]`` end costs. nu: the fixed coefficient (``--lambda_init``).
    Returns:
      ``[B]`` shaped end reward, fed to :func:`kl_shaped_rewards` with ``cost=None``.
    """
    check_same_shape("reward_shaping", reward=reward, cost=cost)
    dtype = float_dtype(reward, cost)
    return jnp.asarray(reward).astype(dtype) - jnp.asarray(nu, dtype) * jnp.asarray(cost).astype(dtype)


def combined_advantages(reward_advantages, cost_advantages, multiplier):
    """PPO-Lag advantage ``(A_r - lambda * A_c) / (1 + lambda)`` with lambda treated as a constant.

    Args:
      reward_advantages: ``[B, T]``.
      cost_advantages: ``[B, T]`` (one constraint) or ``[K, B, T]``.
      multiplier: lambda, a Python number, 0-d or ``[1]`` array (one constraint), or ``[K]`` array; for K
        constraints the combination is ``(A_r - sum_k lambda_k A_c^k) / (1 + sum_k lambda_k)``.
    Returns:
      ``[B, T]``.
    """
    a_r = jnp.asarray(reward_advantages)
    a_c = jnp.asarray(cost_advantages)
    dtype = float_dtype(a_r, a_c)
    lam = jax.lax.stop_gradient(jnp.asarray(multiplier).astype(dtype))
    if lam.ndim > 1:
        raise ValueError(f"safejax.rl.ppo_lag_actor_loss: multiplier must be a scalar or [K], got {list(lam.shape)}")
    if a_c.ndim == a_r.ndim:
        a_c = a_c[None]
    if a_c.shape[1:] != a_r.shape:
        raise ValueError(
            "safejax.rl.ppo_lag_actor_loss: cost_advantages must be [B, T] or [K, B, T] matching reward_advantages "
            f"{list(a_r.shape)}, got {list(jnp.shape(cost_advantages))}")
    lam = jnp.broadcast_to(lam.reshape(-1), (a_c.shape[0],)) if lam.size == 1 else lam
    if lam.shape != (a_c.shape[0],):
        raise ValueError(
            f"safejax.rl.ppo_lag_actor_loss: multiplier shape {list(lam.shape)} does not match "
            f"{a_c.shape[0]} cost constraints")
    # elementwise, not tensordot: a dot_general would run at reduced precision on TPU/GPU by default
    weighted = jnp.sum(lam.reshape((-1,) + (1,) * a_r.ndim) * a_c.astype(dtype), axis=0)
    return (a_r.astype(dtype) - weighted) / (1.0 + jnp.sum(lam))


def ppo_actor_loss(log_probs, old_log_probs, advantages, mask, *, clip_range_ratio):
    """PPO clipped-surrogate actor loss (plain PPO and reward shaping; reference ``actor_loss_fn``).

    ``rho_t = exp(log_probs - old_log_probs)``;
    ``L = -masked_mean(min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t), mask)``.
    ``old_log_probs`` and ``advantages`` are treated as constants. Positions with mask 0 use ratio 1 (so inf/NaN
    log-probs on padding cannot leak into the loss or its gradient).

    Args:
      log_probs: ``[B, T]`` current actor log-probs of the taken actions (differentiated).
      old_log_probs: ``[B, T]`` rollout-time log-probs.
      advantages: ``[B, T]``.
      mask: ``[B, T]``.
      clip_range_ratio: eps (reference: 0.2).
    Returns:
      scalar loss.
    """
    check_ndim("ppo_actor_loss", "log_probs", log_probs, (2,))
    check_same_shape("ppo_actor_loss", log_probs=log_probs, old_log_probs=old_log_probs,
                     advantages=advantages, mask=mask)
    dtype = float_dtype(log_probs, old_log_probs, advantages)
    m = jnp.asarray(mask) != 0
    lp = jnp.asarray(log_probs).astype(dtype)
    old = jax.lax.stop_gradient(jnp.asarray(old_log_probs).astype(dtype))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages).astype(dtype))
    ratio = jnp.exp(jnp.where(m, lp - old, 0))
    adv = jnp.where(m, adv, 0)
    eps = jnp.asarray(clip_range_ratio, dtype)
    surrogate = jnp.minimum(adv * ratio, adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps))
    return -masked_mean(surrogate, m)


def ppo_lag_actor_loss(log_probs, old_log_probs, reward_advantages, cost_advantages, mask, *, multiplier,
                       clip_range_ratio):
    """PPO-Lagrangian actor loss: :func:`ppo_actor_loss` on ``(A_r - lambda A_c) / (1 + lambda)``.

    lambda (``multiplier``) gets ``stop_gradient``: the actor loss never moves it.

    Args:
      log_probs, old_log_probs: ``[B, T]``.
      reward_advantages: ``[B, T]``.
      cost_advantages: ``[B, T]``, or ``[K, B, T]`` with a ``[K]`` multiplier.
      mask: ``[B, T]``.
      multiplier: lambda = ``multiplier(lagrange_state)``; a number, 0-d, ``[1]`` or ``[K]`` array.
      clip_range_ratio: eps.
    Returns:
      scalar loss.
    """
    adv = combined_advantages(reward_advantages, cost_advantages, multiplier)
    return ppo_actor_loss(log_probs, old_log_probs, adv, mask, clip_range_ratio=clip_range_ratio)


def value_loss(values, old_values, returns, mask, *, clip_range_value):
    """Clipped critic loss (reference ``critic_loss_fn``).

    ``V_clip = clip(V, V_old - eps_v, V_old + eps_v)``;
    ``L = 0.5 * masked_mean(max((V - G)^2, (V_clip - G)^2), mask)``. ``old_values`` and ``returns`` are constants.

    Args:
      values: ``[B, T]`` current critic values (differentiated).
      old_values: ``[B, T]`` rollout-time values.
      returns: ``[B, T]`` GAE returns.
      mask: ``[B, T]``.
      clip_range_value: eps_v (reference: 5.0).
    Returns:
      scalar loss.
    """
    check_ndim("value_loss", "values", values, (2,))
    check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    dtype = float_dtype(values, old_values, returns)
    m = jnp.asarray(mask) != 0
    # zero padded positions first so inf/NaN there cannot reach the gradient through the masked mean
    v = jnp.where(m, jnp.asarray(values).astype(dtype), 0)
    old = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(old_values).astype(dtype), 0))
    g = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(returns).astype(dtype), 0))
    eps = jnp.asarray(clip_range_value, dtype)
    v_clip = jnp.clip(v, old - eps, old + eps)
    loss = jnp.maximum(jnp.square(v - g), jnp.square(v_clip - g))
    return 0.5 * masked_mean(loss, m)

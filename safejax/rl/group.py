"""Critic-free RL (GRPO / RLOO / Dr. GRPO and GRPO-Lagrangian): group-relative advantages, the k3 KL estimator and
the sequence-level PPO-clipped loss.

Rows of one group (the G responses sampled for one prompt) are consecutive: row ``b`` belongs to group
``b // group_size``. Reward and cost scores are normalised **separately** per group and then combined as Safe RLHF
combines advantages, ``(A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k)`` per sequence
(:func:`safejax.rl.combined_advantages` accepts ``[B]`` sequence-level advantages as well as ``[B, T]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_ndim, check_same_shape, float_dtype
from safejax.rl.masked import masked_mean, masked_sum
from safejax.rl.ppo import combined_advantages, ppo_actor_loss

GROUP_ADVANTAGE_METHODS = ("grpo", "rloo", "dr_grpo")


def group_advantages(scores, *, group_size, method="grpo", eps=1e-6):
    """Group-relative advantages of sequence scores (constants: ``stop_gradient``).

    With ``s`` the scores of one group of G = ``group_size`` consecutive rows, ``mean`` its mean and ``std`` its
    standard deviation with ``ddof = 1``:

    - ``"grpo"`` (DeepSeekMath): ``(s - mean) / (std + eps)``;
    - ``"rloo"`` (leave-one-out): ``s - (sum(s) - s) / (G - 1)``, i.e. minus the mean of the other G - 1;
    - ``"dr_grpo"`` (Dr. GRPO, no std division): ``s - mean``.

    Args:
      scores: ``[B]`` per-sequence scores (reward, or one constraint's cost), ``B = num_groups * G``.
      group_size: G >= 2 (a static Python int).
      method: one of ``"grpo"``, ``"rloo"``, ``"dr_grpo"``.
      eps: added to the std (``"grpo"`` only).
    Returns:
      ``[B]`` advantages (float32, float64 for float64 scores).
    Raises:
      ValueError: unknown method, ``group_size < 2``, scores not 1-D, or B not a multiple of G.
    """
    fn = "group_advantages"
    if method not in GROUP_ADVANTAGE_METHODS:
        raise ValueError(f"safejax.rl.{fn}: method must be one of {list(GROUP_ADVANTAGE_METHODS)}, got {method!r}")
    g = int(group_size)
    if g < 2:
        raise ValueError(f"safejax.rl.{fn}: group_size must be >= 2, got {group_size}")
    check_ndim(fn, "scores", scores, (1,))
    b = jnp.shape(scores)[0]
    if b % g:
        raise ValueError(f"safejax.rl.{fn}: batch size {b} is not a multiple of group_size {g}")
    dtype = float_dtype(scores)
    s = jax.lax.stop_gradient(jnp.asarray(scores).astype(dtype)).reshape(b // g, g)
    total = jnp.sum(s, axis=1, keepdims=True)
    mean = total / g
    if method == "rloo":
        adv = s - (total - s) / (g - 1)
    elif method == "dr_grpo":
        adv = s - mean
    else:
        std = jnp.sqrt(jnp.sum(jnp.square(s - mean), axis=1, keepdims=True) / (g - 1))
        adv = (s - mean) / (std + jnp.asarray(eps, dtype))
    return adv.reshape(b)


def k3_kl(log_probs, ref_log_probs):
    """Per-token k3 KL estimator (Schulman; DeepSeekMath's GRPO penalty): ``exp(r - l) - (r - l) - 1`` with
    ``l = log_probs`` and ``r = ref_log_probs``; ``>= 0``, unbiased for KL(pi || pi_ref) under samples of pi.

    Differentiable in ``log_probs``; ``ref_log_probs`` is a constant. Mask the result yourself (e.g. with
    :func:`safejax.rl.masked_mean`); padded positions should hold finite values (or go through ``jnp.where``).

    Args:
      log_probs: ``[B, T]`` current policy log-probs of the sampled tokens.
      ref_log_probs: ``[B, T]`` reference-model log-probs of the same tokens.
    Returns:
      ``[B, T]``.
    """
    check_same_shape("k3_kl", log_probs=log_probs, ref_log_probs=ref_log_probs)
    dtype = float_dtype(log_probs, ref_log_probs)
    d = jax.lax.stop_gradient(jnp.asarray(ref_log_probs).astype(dtype)) - jnp.asarray(log_probs).astype(dtype)
    return jnp.exp(d) - d - 1.0


def kl_shaped_scores(reward, cost, old_log_probs, ref_log_probs, mask, *, kl_coeff):
    """The ``k1_reward`` KL mode: ``kl_coeff * sum_t (old_log_probs - ref_log_probs)`` over each sequence's response
    tokens is subtracted from its reward and added to its cost(s), before the group normalisation (Safe RLHF shapes
    both signals this way, so the KL weight in ``(A_r - lambda A_c) / (1 + lambda)`` stays ``kl_coeff``).

    Args:
      reward: ``[B]`` reward-model end scores.
      cost: None, ``[B]`` or ``[K, B]`` cost-model end scores.
      old_log_probs, ref_log_probs: ``[B, T]`` rollout-time policy and reference log-probs (constants).
      mask: ``[B, T]`` response mask.
      kl_coeff: beta.
    Returns:
      ``(reward [B], cost [B] | [K, B] | None)`` shaped scores (``stop_gradient``).
    """
    fn = "kl_shaped_scores"
    check_ndim(fn, "old_log_probs", old_log_probs, (2,))
    check_same_shape(fn, old_log_probs=old_log_probs, ref_log_probs=ref_log_probs, mask=mask)
    b = jnp.shape(old_log_probs)[0]
    if tuple(jnp.shape(reward)) != (b,):
        raise ValueError(f"safejax.rl.{fn}: reward must have shape [{b}], got {list(jnp.shape(reward))}")
    if cost is not None and (jnp.ndim(cost) not in (1, 2) or tuple(jnp.shape(cost)[-1:]) != (b,)):
        raise ValueError(f"safejax.rl.{fn}: cost must have shape [{b}] or [K, {b}], got {list(jnp.shape(cost))}")
    dtype = float_dtype(reward, cost, old_log_probs, ref_log_probs)
    m = jnp.asarray(mask) != 0
    kl = masked_sum(jnp.where(m, jnp.asarray(old_log_probs).astype(dtype) - jnp.asarray(ref_log_probs).astype(dtype),
                              0), m)
    pen = jax.lax.stop_gradient(jnp.asarray(kl_coeff, dtype) * kl)
    sg = jax.lax.stop_gradient
    shaped_reward = sg(jnp.asarray(reward).astype(dtype)) - pen
    shaped_cost = None if cost is None else sg(jnp.asarray(cost).astype(dtype)) + pen
    return shaped_reward, shaped_cost


def grpo_actor_loss(log_probs, old_log_probs, reward_advantages, mask, *, clip_range_ratio, cost_advantages=None,
                    multiplier=0.0, ref_log_probs=None, kl_coeff=0.0):
    """Sequence-level PPO-clipped loss of GRPO / GRPO-Lagrangian.

    ``A = (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k)`` per sequence (``A = A_r`` without costs), broadcast
    over the sequence's response tokens; then :func:`safejax.rl.ppo_actor_loss` (clipped token ratios, mean over
    each sequence's tokens, then mean over sequences); plus ``kl_coeff * masked_mean(k3_kl(log_probs,
    ref_log_probs), mask)`` when ``ref_log_probs`` is given (the ``k3_loss`` KL mode; the same token-then-sequence
    mean). lambda, the advantages and the old log-probs are constants.

    Args:
      log_probs: ``[B, T]`` current policy log-probs (differentiated).
      old_log_probs: ``[B, T]`` rollout-time log-probs.
      reward_advantages: ``[B]`` group-relative reward advantages (:func:`group_advantages`).
      mask: ``[B, T]`` response mask.
      clip_range_ratio: eps of the ratio clip.
      cost_advantages: None (plain GRPO), ``[B]`` or ``[K, B]`` group-relative cost advantages.
      multiplier: lambda, scalar or ``[K]`` (``safejax.rl.multiplier(state)``); ignored without costs.
      ref_log_probs: optional ``[B, T]`` reference log-probs for the k3 term.
      kl_coeff: beta of the k3 term (DeepSeekMath: 0.04).
    Returns:
      scalar loss.
    """
    fn = "grpo_actor_loss"
    check_ndim(fn, "log_probs", log_probs, (2,))
    b, t = jnp.shape(log_probs)
    check_ndim(fn, "reward_advantages", reward_advantages, (1,))
    if jnp.shape(reward_advantages)[0] != b:
        raise ValueError(f"safejax.rl.{fn}: reward_advantages must have shape [{b}], got "
                         f"{list(jnp.shape(reward_advantages))}")
    adv = (jnp.asarray(reward_advantages) if cost_advantages is None
           else combined_advantages(reward_advantages, cost_advantages, multiplier))
    adv = jnp.broadcast_to(adv[:, None], (b, t))
    loss = ppo_actor_loss(log_probs, old_log_probs, adv, mask, clip_range_ratio=clip_range_ratio)
    if ref_log_probs is not None:
        check_same_shape(fn, log_probs=log_probs, ref_log_probs=ref_log_probs, mask=mask)
        m = jnp.asarray(mask) != 0
        lp = jnp.where(m, jnp.asarray(log_probs), 0)
        ref = jnp.where(m, jnp.asarray(ref_log_probs), 0)
        loss = loss + jnp.asarray(kl_coeff, loss.dtype) * masked_mean(k3_kl(lp, ref), m)
    return loss

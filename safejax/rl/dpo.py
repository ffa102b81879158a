"""Offline preference losses on summed response log-probs: DPO, the SafeDPO-style label transform and margin, BFPO.

Inputs are per-pair sums of response log-probs ``[B]`` (policy and reference), e.g. from
:func:`safejax.rl.dpo_log_ratios`'s window or a masked sum; reference log-probs are constants (``stop_gradient``).
``h = (policy_better - ref_better) - (policy_worse - ref_worse)`` is the DPO log-ratio margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_ndim, check_same_shape, float_dtype


def _margin(fn, policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp):
    check_ndim(fn, "policy_better_logp", policy_better_logp, (1,))
    check_same_shape(fn, policy_better_logp=policy_better_logp, policy_worse_logp=policy_worse_logp,
                     ref_better_logp=ref_better_logp, ref_worse_logp=ref_worse_logp)
    dtype = float_dtype(policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp)
    sg = jax.lax.stop_gradient

    def f(x):
        return jnp.asarray(x).astype(dtype)

    return ((f(policy_better_logp) - sg(f(ref_better_logp))) - (f(policy_worse_logp) - sg(f(ref_worse_logp))))


def dpo_loss(policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp, *, beta):
    """DPO loss ``mean_i -log sigmoid(beta * h_i)`` (computed as ``-log_sigmoid``, stable for any margin).

    Args:
      policy_better_logp, policy_worse_logp: ``[B]`` summed policy log-probs of the preferred / other response.
      ref_better_logp, ref_worse_logp: ``[B]`` the reference model's sums (constants).
      beta: the DPO temperature (the reference's ``scale_coeff``, 0.1).
    Returns:
      scalar. The implicit rewards the reference logs are ``beta * (policy - ref)`` per response.
    """
    h = _margin("dpo_loss", policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp)
    return -jnp.mean(jax.nn.log_sigmoid(jnp.asarray(beta, h.dtype) * h))


def dpo_metrics(policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp, *, beta):
    """The implicit-reward metrics the reference's DPO logs (means over the batch).

    Implicit reward ``r = beta * (policy - ref)`` per response. Args as :func:`dpo_loss`.

    Returns:
      dict of scalars: ``better_sample_reward``, ``worse_sample_reward``, ``reward_accuracy`` (fraction of pairs
      with ``r+ > r-``), ``reward_margin`` (mean of ``r+ - r-``).
    """
    _margin("dpo_metrics", policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp)  # shape checks
    dtype = float_dtype(policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp)
    beta = jnp.asarray(beta, dtype)
    r_b = jax.lax.stop_gradient(beta * (jnp.asarray(policy_better_logp).astype(dtype)
                                        - jnp.asarray(ref_better_logp).astype(dtype)))
    r_w = jax.lax.stop_gradient(beta * (jnp.asarray(policy_worse_logp).astype(dtype)
                                        - jnp.asarray(ref_worse_logp).astype(dtype)))
    return {"better_sample_reward": jnp.mean(r_b), "worse_sample_reward": jnp.mean(r_w),
            "reward_accuracy": jnp.mean((r_b > r_w).astype(dtype)), "reward_margin": jnp.mean(r_b - r_w)}


def safe_dpo_labels(better_response_id, is_response_0_safe, is_response_1_safe):
    """SafeDPO-style label transform on PKU-SafeRLHF pairs (helpfulness preference made safety-aware).

    Per pair, with ``w`` = the preferred (``better_response_id``) response and ``l`` the other:
    keep it when ``w`` is safe; swap it (``l`` becomes the chosen response) when ``w`` is unsafe and ``l`` safe;
    drop it when both are unsafe.

    Args:
      better_response_id: ``[B]`` int, 0 or 1.
      is_response_0_safe, is_response_1_safe: ``[B]`` bool safety labels.
    Returns:
      ``(chosen_id [B] int32, keep [B] bool, labels_differ [B] bool)``: the index of the response to treat as
      preferred, whether the pair is used, and whether its two safety labels differ (where the optional safety
      margin of :func:`safe_dpo_loss` applies; after the transform the chosen one is then the safe one).
    """
    fn = "safe_dpo_labels"
    check_ndim(fn, "better_response_id", better_response_id, (1,))
    check_same_shape(fn, better_response_id=better_response_id, is_response_0_safe=is_response_0_safe,
                     is_response_1_safe=is_response_1_safe)
    better = jnp.asarray(better_response_id).astype(jnp.int32)
    s0 = jnp.asarray(is_response_0_safe).astype(bool)
    s1 = jnp.asarray(is_response_1_safe).astype(bool)
    w_safe = jnp.where(better == 0, s0, s1)
    l_safe = jnp.where(better == 0, s1, s0)
    chosen = jnp.where(w_safe, better, 1 - better).astype(jnp.int32)
    keep = w_safe | l_safe
    return chosen, keep, s0 != s1


def safe_dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, keep,
                  labels_differ, *, beta, safety_margin=0.0):
    """DPO on :func:`safe_dpo_labels`' pairs, with the optional safety margin of Kim et al. (2025).

    ``L = sum_i keep_i * -log sigmoid(beta * h_i - safety_margin * labels_differ_i) / max(sum_i keep_i, 1)``, ``h``
    the log-ratio margin of chosen over rejected. With ``safety_margin = 0`` this is :func:`dpo_loss` over the kept
    pairs. The margin (>= 0) asks the policy to prefer the safe response of a mixed pair by an extra
    ``safety_margin / beta`` in log-ratio.

    Args:
      policy_chosen_logp, policy_rejected_logp: ``[B]`` summed policy log-probs after the transform (gather with
        ``chosen_id``: chosen = ``where(chosen_id == 0, logp_0, logp_1)``, rejected the other).
      ref_chosen_logp, ref_rejected_logp: ``[B]`` the reference model's sums (constants).
      keep: ``[B]`` bool, pairs that count. labels_differ: ``[B]`` bool (from :func:`safe_dpo_labels`).
      beta: DPO temperature. safety_margin: Delta.
    Returns:
      scalar (0 when no pair is kept).
    """
    fn = "safe_dpo_loss"
    h = _margin(fn, policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    check_same_shape(fn, policy_chosen_logp=policy_chosen_logp, keep=keep, labels_differ=labels_differ)
    k = jnp.asarray(keep).astype(bool)
    logits = jnp.asarray(beta, h.dtype) * h - jnp.asarray(safety_margin, h.dtype) * jnp.asarray(
        labels_differ).astype(h.dtype)
    per_pair = jnp.where(k, -jax.nn.log_sigmoid(logits), 0)
    return jnp.sum(per_pair) / jnp.maximum(jnp.sum(k), 1).astype(h.dtype)


def bfpo_loss(policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp, better_is_safe,
              worse_is_safe, *, beta, b1=3.0, alpha=0.5):
    """BFPO loss (Zhang et al. 2025): ``mean_i (h_i - (1/beta) * (B1 * B3 * s_w - B3 * s_l - alpha))^2``.

    ``h`` is the DPO log-ratio margin of the better (``better_response_id``) response over the other, ``s = 1`` for
    a safe response and 0 otherwise, ``B3 = 1 / (B1 - 1)``. The IPO-style squared loss pulls ``h`` to a target
    that is largest when the better response is the safe one and the other unsafe.

    Args:
      policy_better_logp, policy_worse_logp: ``[B]`` summed policy log-probs.
      ref_better_logp, ref_worse_logp: ``[B]`` the reference model's sums (constants).
      better_is_safe, worse_is_safe: ``[B]`` bool safety labels of the two responses.
      beta: temperature. b1: B1 (default 3, must not be 1). alpha: alpha (default 0.5).
    Returns:
      scalar.
    """
    fn = "bfpo_loss"
    h = _margin(fn, policy_better_logp, policy_worse_logp, ref_better_logp, ref_worse_logp)
    check_same_shape(fn, policy_better_logp=policy_better_logp, better_is_safe=better_is_safe,
                     worse_is_safe=worse_is_safe)
    if not isinstance(b1, jax.Array) and float(b1) == 1.0:
        raise ValueError("safejax.rl.bfpo_loss: b1 must not be 1 (B3 = 1 / (B1 - 1))")
    dt = h.dtype
    b1 = jnp.asarray(b1, dt)
    b3 = 1.0 / (b1 - 1.0)
    s_w = jnp.asarray(better_is_safe).astype(bool).astype(dt)
    s_l = jnp.asarray(worse_is_safe).astype(bool).astype(dt)
    target = (b1 * b3 * s_w - b3 * s_l - jnp.asarray(alpha, dt)) / jnp.asarray(beta, dt)
    return jnp.mean(jnp.square(h - target))

"""K constraints in the PPO-Lagrangian actor loss: parity with a NumPy implementation of
``(A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k)`` inside the clipped surrogate, and K = 1 bit-identical to the
single-constraint formula ``(A_r - lambda A_c) / (1 + lambda)`` evaluated the old way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import right_padded_mask, x64


def np_clipped_loss_and_grad(lp, old, adv, mask, eps):
    """Vectorised NumPy clipped surrogate, mean over each row's masked tokens then over rows; d loss / d lp."""
    m = mask != 0
    n = np.maximum(m.sum(-1, keepdims=True), 1)
    rho = np.where(m, np.exp(lp - old), 1.0)
    adv = np.where(m, adv, 0.0)
    s1, s2 = adv * rho, adv * np.clip(rho, 1 - eps, 1 + eps)
    b = lp.shape[0]
    loss = -np.sum(np.where(m, np.minimum(s1, s2), 0.0) / n) / b
    unclipped = (s1 <= s2) | ((rho > 1 - eps) & (rho < 1 + eps))
    grad = np.where(m & unclipped, -adv * rho / n / b, 0.0)
    return loss, grad


def np_combined(a_r, a_c, lam):
    """(A_r - sum_k lam_k A_c[k]) / (1 + sum_k lam_k) with an explicit loop over k."""
    num = a_r.copy()
    for k in range(a_c.shape[0]):
        num = num - lam[k] * a_c[k]
    return num / (1.0 + np.sum(lam))


def _inputs(rng, k, b, t):
    old = rng.normal(size=(b, t)) - 2.0
    lp = old + rng.normal(size=(b, t))
    a_r = rng.normal(size=(b, t))
    a_c = rng.normal(size=(k, b, t))
    mask = right_padded_mask(rng, b, t, min_len=1)
    return lp, old, a_r, a_c, mask


@pytest.mark.parametrize("k,b,t", [(1, 3, 4), (3, 2, 5), (3, 6, 9), (4, 8, 3)])
def test_ppo_lag_actor_loss_with_k_constraints_matches_numpy_value_and_gradient(k, b, t):
    rng = np.random.default_rng(100 * k + b)
    lp, old, a_r, a_c, mask = _inputs(rng, k, b, t)
    lam = rng.uniform(0.0, 3.0, size=k)
    want, want_grad = np_clipped_loss_and_grad(lp, old, np_combined(a_r, a_c, lam), mask, 0.2)
    with x64():
        def f(x):
            return rl.ppo_lag_actor_loss(x, old, a_r, a_c, mask, multiplier=lam, clip_range_ratio=0.2)
        got, grad = jax.value_and_grad(f)(jnp.asarray(lp))
        np.testing.assert_allclose(np.asarray(rl.combined_advantages(a_r, a_c, lam)), np_combined(a_r, a_c, lam),
                                   rtol=1e-12, atol=1e-12)
    assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-10, atol=1e-12)


def _frozen_combined_advantages(a_r, a_c, lam):
    """A frozen copy of the advantage arithmetic of ``combined_advantages`` at commit da03b2c (before the K-constraint
    work): the one-constraint cost advantage gets a leading axis, lambda is broadcast to ``[1]``, the weighted sum
    is an elementwise product reduced over that axis. Under jit this differs in the last bit from the naive
    ``(A_r - lam A_c) / (1 + lam)`` (XLA may fuse the naive form's multiply-subtract), so bit-identity is checked
    against this exact path; eagerly both forms agree bit for bit."""
    a_r = jnp.asarray(a_r)
    a_c = jnp.asarray(a_c)
    lam = jax.lax.stop_gradient(jnp.asarray(lam).astype(jnp.float32))
    if a_c.ndim == a_r.ndim:
        a_c = a_c[None]
    lam = jnp.broadcast_to(lam.reshape(-1), (a_c.shape[0],))
    weighted = jnp.sum(lam.reshape((-1,) + (1,) * a_r.ndim) * a_c.astype(jnp.float32), axis=0)
    return (a_r.astype(jnp.float32) - weighted) / (1.0 + jnp.sum(lam))


def _old_ppo_lag_actor_loss(log_probs, old_log_probs, a_r, a_c, mask, *, multiplier, clip_range_ratio):
    """The single-constraint path before K constraints: one scalar lambda, one [B, T] cost advantage."""
    adv = _frozen_combined_advantages(a_r, a_c, multiplier)
    return rl.ppo_actor_loss(log_probs, old_log_probs, adv, mask, clip_range_ratio=clip_range_ratio)


@pytest.mark.parametrize("b,t", [(2, 3), (5, 7), (8, 16)])
@pytest.mark.parametrize("lam_form", ["float", "0d", "[1]"])
@pytest.mark.parametrize("cost_form", ["[B,T]", "[1,B,T]"])
def test_one_constraint_is_bit_identical_to_the_single_lambda_path(b, t, lam_form, cost_form):
    rng = np.random.default_rng(b * t)
    lp, old, a_r, a_c, mask = (x.astype(np.float32) for x in _inputs(rng, 1, b, t))
    lam_value = np.float32(rng.uniform(0.1, 4.0))
    lam = {"float": float(lam_value), "0d": jnp.asarray(lam_value), "[1]": jnp.asarray([lam_value])}[lam_form]
    cost = a_c if cost_form == "[1,B,T]" else a_c[0]
    new = jax.value_and_grad(lambda x: rl.ppo_lag_actor_loss(x, old, a_r, cost, mask, multiplier=lam,
                                                             clip_range_ratio=0.2))
    old_fn = jax.value_and_grad(lambda x: _old_ppo_lag_actor_loss(x, old, a_r, a_c[0], mask, multiplier=lam_value,
                                                                  clip_range_ratio=0.2))
    for wrap in (lambda f: f, jax.jit):
        (v_new, g_new), (v_old, g_old) = wrap(new)(jnp.asarray(lp)), wrap(old_fn)(jnp.asarray(lp))
        assert v_new.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v_new), np.asarray(v_old))
        np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_old))
    # eagerly, also bit-identical to the textbook single-lambda formula
    adv_naive = (jnp.asarray(a_r) - jnp.float32(lam_value) * jnp.asarray(a_c[0])) / (1.0 + jnp.float32(lam_value))
    np.testing.assert_array_equal(np.asarray(rl.combined_advantages(a_r, cost, lam)), np.asarray(adv_naive))


@pytest.mark.parametrize("rule", ["sgd_log", "pid"])
def test_multiplier_of_either_rule_feeds_the_k_constraint_loss(rule):
    rng = np.random.default_rng(7)
    lp, old, a_r, a_c, mask = (x.astype(np.float32) for x in _inputs(rng, 3, 4, 6))
    costs = jnp.asarray(rng.normal(1.0, 1.0, size=(3, 4)), jnp.float32)
    if rule == "pid":
        state = rl.pid_lagrange_update(rl.pid_lagrange_init(num_constraints=3), costs, threshold=0.0,
                                       **rl.SUGGESTED_PID_GAINS)
    else:
        state = rl.lagrange_update(rl.lagrange_init(1.0, num_constraints=3), costs, threshold=0.0, lambda_lr=0.1)
    lam = rl.multiplier(state)
    assert lam.shape == (3,)
    got = rl.ppo_lag_actor_loss(lp, old, a_r, a_c, mask, multiplier=lam, clip_range_ratio=0.2)
    want, _ = np_clipped_loss_and_grad(lp.astype(np.float64), old, np_combined(a_r, a_c, np.asarray(lam, np.float64)),
                                       mask, 0.2)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)

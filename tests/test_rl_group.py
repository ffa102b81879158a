"""Critic-free RL math: group-relative advantages (GRPO, RLOO, Dr. GRPO), the k3 KL estimator and the
sequence-level GRPO(-Lagrangian) loss against NumPy loops over the equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_constraints import np_clipped_loss_and_grad, np_combined
from test_rl_helpers import right_padded_mask, x64


def np_group_advantages(scores, g, method, eps=1e-6):
    out = np.empty_like(scores)
    for start in range(0, len(scores), g):
        s = scores[start:start + g]
        for i in range(g):
            if method == "grpo":
                out[start + i] = (s[i] - s.mean()) / (np.std(s, ddof=1) + eps)
            elif method == "rloo":
                out[start + i] = s[i] - np.mean(np.delete(s, i))
            else:
                out[start + i] = s[i] - s.mean()
    return out


@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("groups,g", [(1, 2), (3, 4), (5, 3), (2, 8)])
def test_group_advantages_match_numpy_per_group_equations(method, groups, g):
    rng = np.random.default_rng(groups * 10 + g)
    scores = rng.normal(size=groups * g) * 3.0 + rng.normal(size=groups * g).round()
    want = np_group_advantages(scores, g, method)
    with x64():
        got = rl.group_advantages(jnp.asarray(scores), group_size=g, method=method)
        assert got.shape == (groups * g,) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
    got32 = jax.jit(lambda s: rl.group_advantages(s, group_size=g, method=method))(jnp.asarray(scores, jnp.float32))
    np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-4, atol=1e-5)


def test_group_advantages_use_consecutive_rows_as_groups():
    scores = jnp.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    swapped = jnp.concatenate([scores[3:], scores[:3]])
    a = rl.group_advantages(scores, group_size=3, method="dr_grpo")
    b = rl.group_advantages(swapped, group_size=3, method="dr_grpo")
    np.testing.assert_allclose(np.asarray(a), [-1.0, 0.0, 1.0, -10.0, 0.0, 10.0])
    np.testing.assert_allclose(np.asarray(b[:3]), np.asarray(a[3:]))


def test_group_advantages_of_a_constant_group_are_zero_not_nan():
    got = rl.group_advantages(jnp.array([0.5, 0.5, 0.5, 0.5]), group_size=4, method="grpo")
    np.testing.assert_array_equal(np.asarray(got), np.zeros(4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=3), "multiple"), (dict(group_size=1), "group_size"), (dict(group_size=2, method="ppo"), "method"),
])
def test_group_advantages_reject_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rl.group_advantages(jnp.zeros(4), **kwargs)


def test_k3_kl_matches_numpy_is_nonnegative_and_differentiates_only_the_policy():
    rng = np.random.default_rng(0)
    lp, ref = rng.normal(size=(2, 4, 6)) - 1.0
    want = np.exp(ref - lp) - (ref - lp) - 1.0
    with x64():
        got = rl.k3_kl(jnp.asarray(lp), jnp.asarray(ref))
        g_lp, g_ref = jax.grad(lambda a, b: jnp.sum(rl.k3_kl(a, b)), argnums=(0, 1))(jnp.asarray(lp), jnp.asarray(ref))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    assert np.all(np.asarray(got) >= 0)
    np.testing.assert_allclose(np.asarray(g_lp), 1.0 - np.exp(ref - lp), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(g_ref), 0.0)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("kl_coeff", [0.0, 0.04])
def test_grpo_actor_loss_matches_numpy_sequence_level_objective(k, kl_coeff):
    rng = np.random.default_rng(k + 11)
    b, t, g = 6, 5, 3
    old = rng.normal(size=(b, t)) - 2.0
    lp = old + rng.normal(size=(b, t))
    ref = old + 0.3 * rng.normal(size=(b, t))
    mask = right_padded_mask(rng, b, t, min_len=1)
    lp_nan = np.where(mask == 1, lp, np.nan)  # padding must not leak
    a_r = np_group_advantages(rng.normal(size=b), g, "grpo")
    a_c = np.stack([np_group_advantages(rng.normal(size=b), g, "rloo") for _ in range(max(k, 1))])
    lam = rng.uniform(0.2, 2.0, size=max(k, 1))
    seq_adv = a_r if k == 0 else np_combined(a_r[None, :], a_c[:, None, :], lam)[0]
    want, want_grad = np_clipped_loss_and_grad(lp, old, np.broadcast_to(seq_adv[:, None], (b, t)), mask, 0.2)
    k3 = np.exp(ref - lp) - (ref - lp) - 1.0
    want += kl_coeff * np.mean((k3 * mask).sum(-1) / mask.sum(-1))
    want_grad = want_grad + kl_coeff * (1.0 - np.exp(ref - lp)) * mask / mask.sum(-1, keepdims=True) / b
    cost = None if k == 0 else (a_c[0] if k == 1 else a_c)
    with x64():
        def f(x):
            return rl.grpo_actor_loss(x, old, a_r, mask, clip_range_ratio=0.2, cost_advantages=cost,
                                      multiplier=lam if k != 1 else lam[0], ref_log_probs=ref, kl_coeff=kl_coeff)
        got, grad = jax.value_and_grad(f)(jnp.asarray(lp_nan))
    assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.where(mask == 1, want_grad, 0.0), rtol=1e-9, atol=1e-12)


def test_combined_advantages_accept_sequence_level_k_constraints():
    rng = np.random.default_rng(5)
    a_r, lam = rng.normal(size=7), np.array([0.3, 1.2, 0.0])
    a_c = rng.normal(size=(3, 7))
    with x64():
        got = rl.combined_advantages(a_r, a_c, lam)
    np.testing.assert_allclose(np.asarray(got), (a_r - lam @ a_c) / (1 + lam.sum()), rtol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_kl_shaped_scores_move_reward_down_and_costs_up_by_the_sequence_kl(k):
    rng = np.random.default_rng(k)
    b, t = 4, 6
    old, ref = rng.normal(size=(2, b, t))
    mask = right_padded_mask(rng, b, t)
    old_nan = np.where(mask == 1, old, np.nan)  # padding never enters the sum
    reward = rng.normal(size=b)
    cost = None if k == 0 else (rng.normal(size=b) if k == 1 else rng.normal(size=(k, b)))
    pen = 0.05 * np.array([sum(old[i, j] - ref[i, j] for j in range(t) if mask[i, j]) for i in range(b)])
    with x64():
        r, c = rl.kl_shaped_scores(reward, cost, old_nan, ref, mask, kl_coeff=0.05)
    np.testing.assert_allclose(np.asarray(r), reward - pen, rtol=1e-12, atol=1e-14)
    if k == 0:
        assert c is None
    else:
        np.testing.assert_allclose(np.asarray(c), cost + pen, rtol=1e-12, atol=1e-14)

"""Offline preference losses on summed log-probs (DPO, SafeDPO-style transform and margin, BFPO) against NumPy
implementations of their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import right_padded_mask, x64


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sums(rng, b, scale=5.0):
    return tuple(rng.normal(size=b) * scale - 20.0 for _ in range(4))


@pytest.mark.parametrize("b,beta", [(1, 0.1), (6, 0.1), (13, 0.5), (32, 2.0)])
def test_dpo_loss_matches_numpy_value_and_gradient(b, beta):
    rng = np.random.default_rng(b)
    pb, pw, rb, rw = _sums(rng, b)
    h = (pb - rb) - (pw - rw)
    want = np.mean(-np_log_sigmoid(beta * h))
    want_gb = -beta / b / (1.0 + np.exp(beta * h))  # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
    with x64():
        got, (gb, gw, grb) = jax.value_and_grad(
            lambda x, y, z: rl.dpo_loss(x, y, z, rw, beta=beta), argnums=(0, 1, 2))(
                jnp.asarray(pb), jnp.asarray(pw), jnp.asarray(rb))
    assert float(got) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(np.asarray(gb), want_gb, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(gw), -want_gb, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(grb), 0.0)  # the reference model is a constant


def test_dpo_loss_is_finite_for_huge_margins():
    big = jnp.array([1e4, -1e4], jnp.float32)
    z = jnp.zeros(2, jnp.float32)
    got = rl.dpo_loss(big, z, z, z, beta=1.0)
    assert np.isfinite(float(got)) and float(got) == pytest.approx(1e4 / 2, rel=1e-6)


def test_dpo_loss_on_window_sums_equals_the_reference_token_level_loss():
    rng = np.random.default_rng(3)
    b, length = 4, 9
    ids_b = rng.integers(0, 50, size=(b, length))
    ids_w = ids_b.copy()
    ids_w[:, 4:] = rng.integers(50, 100, size=(b, length - 4))
    mb, mw = right_padded_mask(rng, b, length, min_len=6), right_padded_mask(rng, b, length, min_len=6)
    lp_b, lp_w, ref_b, ref_w = (rng.normal(size=(b, length - 1)) for _ in range(4))
    with x64():
        rb, rw = rl.dpo_log_ratios(lp_b, lp_w, ref_b, ref_w, ids_b, ids_w, mb, mw)
        want = rl.dpo_window_loss(lp_b, lp_w, ref_b, ref_w, ids_b, ids_w, mb, mw, scale_coeff=0.1)
        got = rl.dpo_loss(rb, rw, jnp.zeros(b), jnp.zeros(b), beta=0.1)
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def np_safe_dpo_labels(better, s0, s1):
    chosen, keep = [], []
    for bt, a, c in zip(better, s0, s1):
        w_safe, l_safe = (a, c) if bt == 0 else (c, a)
        if w_safe:
            chosen.append(bt), keep.append(True)
        elif l_safe:
            chosen.append(1 - bt), keep.append(True)
        else:
            chosen.append(bt), keep.append(False)
    return np.array(chosen), np.array(keep)


def test_safe_dpo_labels_keep_swap_and_drop_on_every_label_combination():
    better = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s0 = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    s1 = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)
    chosen, keep, differ = rl.safe_dpo_labels(better, s0, s1)
    want_chosen, want_keep = np_safe_dpo_labels(better, s0, s1)
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    np.testing.assert_array_equal(np.asarray(chosen)[want_keep], want_chosen[want_keep])
    np.testing.assert_array_equal(np.asarray(differ), s0 != s1)
    # explicitly: kept as is, swapped, dropped
    assert list(np.asarray(chosen)[[0, 1, 2, 5, 6]]) == [0, 0, 1, 0, 1]
    assert list(np.asarray(keep)[[3, 7]]) == [False, False]
    # after the transform the chosen response is safe whenever the pair is kept
    chosen_safe = np.where(np.asarray(chosen) == 0, s0, s1)
    assert np.all(chosen_safe[np.asarray(keep)])


@pytest.mark.parametrize("b,beta,margin", [(8, 0.1, 0.0), (16, 0.1, 1.5), (31, 1.0, 0.3)])
def test_safe_dpo_loss_matches_numpy_with_and_without_safety_margin(b, beta, margin):
    rng = np.random.default_rng(b)
    better = rng.integers(0, 2, size=b)
    s0, s1 = rng.random(size=(2, b)) < 0.5
    s0[:3], s1[:3] = [False, True, False], [False, False, True]  # a dropped pair and both kinds of mixed pair
    lp0, lp1, ref0, ref1 = _sums(rng, b)
    chosen, keep, differ = rl.safe_dpo_labels(better, s0, s1)
    want_chosen, want_keep = np_safe_dpo_labels(better, s0, s1)
    assert want_keep.sum() >= 1 and (~want_keep).sum() >= 1
    pc, pr = np.where(want_chosen == 0, lp0, lp1), np.where(want_chosen == 0, lp1, lp0)
    rc, rr = np.where(want_chosen == 0, ref0, ref1), np.where(want_chosen == 0, ref1, ref0)
    h = (pc - rc) - (pr - rr)
    logits = beta * h - margin * (s0 != s1)
    want = np.mean(-np_log_sigmoid(logits[want_keep]))
    c = np.asarray(chosen)
    with x64():
        got = rl.safe_dpo_loss(np.where(c == 0, lp0, lp1), np.where(c == 0, lp1, lp0), np.where(c == 0, ref0, ref1),
                               np.where(c == 0, ref1, ref0), keep, differ, beta=beta, safety_margin=margin)
    assert float(got) == pytest.approx(want, rel=1e-12)
    if margin == 0.0:
        with x64():
            plain = rl.dpo_loss(pc[want_keep], pr[want_keep], rc[want_keep], rr[want_keep], beta=beta)
        assert float(got) == pytest.approx(float(plain), rel=1e-12)


def test_safe_dpo_loss_is_zero_when_every_pair_is_dropped():
    z = jnp.zeros(3)
    got = rl.safe_dpo_loss(z, z, z, z, jnp.zeros(3, bool), jnp.zeros(3, bool), beta=0.1)
    assert float(got) == 0.0


def np_bfpo(pb, pw, rb, rw, sw, sl, beta, b1, alpha):
    b3 = 1.0 / (b1 - 1.0)
    h = (pb - rb) - (pw - rw)
    target = (1.0 / beta) * (b1 * b3 * sw.astype(float) - b3 * sl.astype(float) - alpha)
    return np.mean((h - target) ** 2), 2 * (h - target) / len(h)


@pytest.mark.parametrize("b,beta,b1,alpha", [(8, 0.1, 3.0, 0.5), (17, 0.5, 3.0, 0.5), (12, 1.0, 5.0, 0.2)])
def test_bfpo_loss_matches_numpy_value_and_gradient(b, beta, b1, alpha):
    rng = np.random.default_rng(b)
    pb, pw, rb, rw = _sums(rng, b, scale=1.0)
    sw, sl = rng.random(size=(2, b)) < 0.5
    want, want_g = np_bfpo(pb, pw, rb, rw, sw, sl, beta, b1, alpha)
    kwargs = dict(beta=beta) if (b1, alpha) == (3.0, 0.5) else dict(beta=beta, b1=b1, alpha=alpha)
    with x64():
        got, g = jax.value_and_grad(lambda x: rl.bfpo_loss(x, pw, rb, rw, sw, sl, **kwargs))(jnp.asarray(pb))
    assert float(got) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-10)


def test_bfpo_target_orders_the_four_safety_cases():
    # B1 = 3 (B3 = 0.5), alpha = 0.5, beta = 1: (better, other) = (safe, unsafe) gets the largest target
    z = jnp.zeros(4)
    sw = jnp.array([True, True, False, False])
    sl = jnp.array([False, True, False, True])
    per_case = [float(rl.bfpo_loss(z[i:i + 1], z[i:i + 1], z[i:i + 1], z[i:i + 1], sw[i:i + 1], sl[i:i + 1],
                                   beta=1.0)) for i in range(4)]
    # loss at h = 0 is target^2: targets 1.0, 0.5, -0.5, -1.0
    np.testing.assert_allclose(per_case, [1.0, 0.25, 0.25, 1.0], rtol=1e-6)


def test_offline_losses_reject_mismatched_shapes_and_b1_of_one():
    z3, z4 = jnp.zeros(3), jnp.zeros(4)
    with pytest.raises(ValueError, match="dpo_loss"):
        rl.dpo_loss(z3, z4, z3, z3, beta=0.1)
    with pytest.raises(ValueError, match="b1"):
        rl.bfpo_loss(z3, z3, z3, z3, z3 > 0, z3 > 0, beta=0.1, b1=1.0)
    with pytest.raises(ValueError, match="safe_dpo_labels"):
        rl.safe_dpo_labels(jnp.zeros(3, int), z3 > 0, z4 > 0)


def test_dpo_metrics_match_numpy_implicit_rewards():
    rng = np.random.default_rng(9)
    pb, pw, rb, rw = _sums(rng, 10)
    beta = 0.1
    r_b, r_w = beta * (pb - rb), beta * (pw - rw)
    with x64():
        got = rl.dpo_metrics(pb, pw, rb, rw, beta=beta)
    want = {"better_sample_reward": r_b.mean(), "worse_sample_reward": r_w.mean(),
            "reward_accuracy": np.mean(r_b > r_w), "reward_margin": np.mean(r_b - r_w)}
    assert 0.0 < want["reward_accuracy"] < 1.0
    assert set(got) == set(want)
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-12), key

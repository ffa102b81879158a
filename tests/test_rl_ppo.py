"""safejax.rl RL-stage math (masked mean, GAE, KL-shaped rewards, PPO / PPO-Lag losses) against float64 numpy loops
written from SAFE_RLHF.md §5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import holey_mask, last_index, right_padded_mask, x64

TOL = dict(rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ numpy references (explicit loops, float64)

def np_masked_mean(x, mask):
    b, t = x.shape
    rows = []
    for i in range(b):
        s, n = 0.0, 0
        for j in range(t):
            if mask[i, j]:
                s += x[i, j]
                n += 1
        rows.append(s / max(n, 1))
    return sum(rows) / b


def np_gae_reference(values, rewards, mask, start, gamma, lam):
    """The reference get_advantages_and_returns on *full* arrays, looping t = L-2 .. start."""
    values = values * mask
    rewards = rewards * mask
    b, length = rewards.shape
    adv = np.zeros((b, length - start))
    for i in range(b):
        last = 0.0
        for t in reversed(range(start, length)):
            nxt = values[i, t + 1] if t < length - 1 else 0.0
            delta = rewards[i, t] + gamma * nxt - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t - start] = last
    return adv, adv + values[:, start:]


def np_kl_shaped(reward, cost, lp, ref, mask, beta, clip):
    b, t = lp.shape
    r = np.zeros((b, t))
    c = np.zeros((b, t))
    for i in range(b):
        e = last_index(mask[i])
        for j in range(t):
            k = lp[i, j] - ref[i, j]
            r[i, j] = -beta * k + (reward[i] if j == e else 0.0)
            c[i, j] = beta * k + (cost[i] if j == e else 0.0)
            r[i, j] = min(max(r[i, j], -clip), clip)
            c[i, j] = min(max(c[i, j], -clip), clip)
    return r, c


def np_actor_loss_and_grad(lp, old, adv, mask, eps):
    """Loss and d loss / d lp of the clipped surrogate with per-sequence masked mean."""
    b, t = lp.shape
    loss = 0.0
    grad = np.zeros((b, t))
    for i in range(b):
        n = max(int(mask[i].sum()), 1)
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = np.exp(lp[i, j] - old[i, j])
            s1 = adv[i, j] * rho
            rc = min(max(rho, 1 - eps), 1 + eps)
            s2 = adv[i, j] * rc
            loss -= min(s1, s2) / n / b
            if s1 <= s2 or (1 - eps < rho < 1 + eps):
                grad[i, j] = -adv[i, j] * rho / n / b
    return loss, grad


def np_value_loss(v, old, g, mask, eps):
    b, t = v.shape
    x = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            vc = min(max(v[i, j], old[i, j] - eps), old[i, j] + eps)
            x[i, j] = max((v[i, j] - g[i, j]) ** 2, (vc - g[i, j]) ** 2)
    return 0.5 * np_masked_mean(x, mask)


@pytest.fixture(params=["right_padded", "holey"])
def mask_kind(request):
    return request.param


def make_mask(kind, rng, b, t, min_len=0):
    return right_padded_mask(rng, b, t, min_len) if kind == "right_padded" else holey_mask(rng, b, t)


# ------------------------------------------------------------------ masked mean

def test_masked_mean_is_per_sequence_then_batch(mask_kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7))
    m = make_mask(mask_kind, rng, 6, 7)
    with x64():
        got = rl.masked_mean(jnp.asarray(x), jnp.asarray(m))
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), np_masked_mean(x, m), **TOL)
    # differs from a global token mean when lengths differ (the paper-era convention)
    assert abs(float(got) - (x * m).sum() / m.sum()) > 1e-3


def test_masked_mean_ignores_nan_on_padding_and_empty_rows_count_as_zero():
    x = np.array([[1.0, 3.0, np.nan], [np.inf, 5.0, 5.0]], np.float32)
    m = np.array([[1, 1, 0], [0, 0, 0]])
    assert float(rl.masked_mean(x, m)) == pytest.approx((2.0 + 0.0) / 2)


# ------------------------------------------------------------------ GAE

def test_gae_matches_reference_loop_on_sliced_response(mask_kind):
    rng = np.random.default_rng(1)
    b, length, start = 5, 12, 4
    values = rng.normal(size=(b, length))
    rewards = rng.normal(size=(b, length))
    mask = np.ones((b, length), np.int32)
    mask[:, start:] = make_mask(mask_kind, rng, b, length - start)
    ref_adv, ref_ret = np_gae_reference(values, rewards, mask, start, 1.0, 0.95)
    with x64():
        adv, ret = rl.gae(jnp.asarray(values[:, start:]), jnp.asarray(rewards[:, start:]),
                          jnp.asarray(mask[:, start:]))
        assert adv.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(adv), ref_adv, **TOL)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, **TOL)


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 1.0)])
def test_gae_other_gamma_lambda_match_reference_loop(gamma, lam):
    rng = np.random.default_rng(2)
    values, rewards = rng.normal(size=(2, 4, 9))
    mask = right_padded_mask(rng, 4, 9)
    ref_adv, ref_ret = np_gae_reference(values, rewards, mask, 0, gamma, lam)
    with x64():
        adv, ret = rl.gae(values, rewards, mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, **TOL)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, **TOL)


def test_gae_tail_is_zero_and_last_token_bootstraps_from_zero():
    values = np.array([[1.0, 2.0, 3.0, 7.0, 9.0]])
    rewards = np.array([[0.5, 0.0, 4.0, 8.0, 8.0]])
    mask = np.array([[1, 1, 1, 0, 0]])
    with x64():
        adv, ret = rl.gae(values, rewards, mask, gamma=1.0, lam=1.0)
    adv, ret = np.asarray(adv)[0], np.asarray(ret)[0]
    np.testing.assert_allclose(adv[3:], 0.0)
    np.testing.assert_allclose(ret[3:], 0.0)
    assert adv[2] == pytest.approx(4.0 - 3.0)  # delta at e uses V_{e+1} = 0, not 7
    np.testing.assert_allclose(ret[:3], [4.5, 4.0, 4.0])  # gamma = lam = 1: returns are reward-to-go


def test_gae_outputs_carry_no_gradient():
    v = jnp.ones((2, 3))
    g = jax.grad(lambda v: jnp.sum(rl.gae(v, v, jnp.ones((2, 3)))[0]))(v)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------ KL-shaped per-token reward / cost

def test_kl_shaped_rewards_match_reference_with_clipping(mask_kind):
    rng = np.random.default_rng(3)
    b, t = 6, 8
    reward, cost = 3.0 * rng.normal(size=(2, b))
    lp, ref = 2.0 * rng.normal(size=(2, b, t))
    mask = make_mask(mask_kind, rng, b, t, min_len=1)
    beta, clip = 0.7, 2.5
    want_r, want_c = np_kl_shaped(reward, cost, lp, ref, mask, beta, clip)
    assert (np.abs(want_r) == clip).sum() > 2 and (np.abs(want_c) == clip).sum() > 2  # clipping is exercised
    with x64():
        r, c = rl.kl_shaped_rewards(reward, cost, lp, ref, mask, kl_coeff=beta, clip_range_score=clip)
        assert r.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(r), want_r, **TOL)
    np.testing.assert_allclose(np.asarray(c), want_c, **TOL)


def test_kl_enters_cost_with_plus_sign_and_end_score_sits_at_last_valid_action():
    lp = np.array([[-1.0, -2.0, -1.5, -3.0]])
    ref = np.array([[-1.5, -2.5, -1.0, -1.0]])  # k = [.5, .5, -.5, -2]
    mask = np.array([[1, 1, 1, 0]])
    r, c = rl.kl_shaped_rewards(np.array([10.0]), np.array([-4.0]), lp, ref, mask, kl_coeff=0.1,
                                clip_range_score=50.0)
    np.testing.assert_allclose(np.asarray(r)[0], [-0.05, -0.05, 10.05, 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c)[0], [0.05, 0.05, -4.05, -0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r + c)[0], [0, 0, 6.0, 0], atol=1e-6)


def test_kl_shaped_rewards_plain_ppo_and_k_constraints():
    rng = np.random.default_rng(4)
    lp, ref = rng.normal(size=(2, 3, 5))
    mask = right_padded_mask(rng, 3, 5, min_len=1)
    reward = rng.normal(size=3)
    costs = rng.normal(size=(2, 3))
    r0, none = rl.kl_shaped_rewards(reward, None, lp, ref, mask, kl_coeff=0.2, clip_range_score=50.0)
    assert none is None
    r1, ck = rl.kl_shaped_rewards(reward, costs, lp, ref, mask, kl_coeff=0.2, clip_range_score=50.0)
    assert ck.shape == (2, 3, 5) and r1.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(r0), np.asarray(r1))
    for k in range(2):
        _, ck1 = rl.kl_shaped_rewards(reward, costs[k], lp, ref, mask, kl_coeff=0.2, clip_range_score=50.0)
        np.testing.assert_allclose(np.asarray(ck[k]), np.asarray(ck1), rtol=1e-6)


def test_kl_shaped_rewards_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="reward"):
        rl.kl_shaped_rewards(np.zeros(2), None, np.zeros((3, 4)), np.zeros((3, 4)), np.ones((3, 4)),
                             kl_coeff=0.1, clip_range_score=5.0)
    with pytest.raises(ValueError, match="ref_log_probs"):
        rl.kl_shaped_rewards(np.zeros(3), None, np.zeros((3, 4)), np.zeros((3, 5)), np.ones((3, 4)),
                             kl_coeff=0.1, clip_range_score=5.0)


def test_reward_shaping_is_reward_minus_nu_cost():
    np.testing.assert_allclose(np.asarray(rl.reward_shaping(np.array([1.0, 2.0]), np.array([0.5, -1.0]), nu=2.0)),
                               [0.0, 4.0])


# ------------------------------------------------------------------ actor losses

def _actor_inputs(seed, mask_kind):
    rng = np.random.default_rng(seed)
    b, t = 5, 7
    old = rng.normal(size=(b, t)) - 2.0
    lp = old + rng.normal(size=(b, t))  # ratios far from 1: clipping active on both sides
    a_r, a_c = rng.normal(size=(2, b, t))
    mask = make_mask(mask_kind, rng, b, t, min_len=1)
    return lp, old, a_r, a_c, mask


def test_ppo_lag_actor_loss_matches_reference_and_clipping_is_active(mask_kind):
    lp, old, a_r, a_c, mask = _actor_inputs(5, mask_kind)
    lam, eps = 1.7, 0.2
    adv = (a_r - lam * a_c) / (1 + lam)
    want, want_grad = np_actor_loss_and_grad(lp, old, adv, mask, eps)
    rho = np.exp(lp - old)[mask == 1]
    assert (rho > 1 + eps).sum() > 2 and (rho < 1 - eps).sum() > 2
    with x64():
        def f(lp_):
            return rl.ppo_lag_actor_loss(lp_, old, a_r, a_c, mask, multiplier=lam, clip_range_ratio=eps)
        got, grad = jax.value_and_grad(f)(jnp.asarray(lp))
        assert got.dtype == jnp.float64
    assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, **TOL)
    assert np.count_nonzero(want_grad) < mask.sum()  # some clipped positions have zero gradient


def test_ppo_lag_actor_loss_gradient_matches_finite_differences():
    lp, old, a_r, a_c, mask = _actor_inputs(6, "right_padded")
    with x64():
        def f(x):
            return rl.ppo_lag_actor_loss(x, old, a_r, a_c, mask, multiplier=jnp.array([0.5]), clip_range_ratio=0.2)
        grad = np.asarray(jax.grad(f)(jnp.asarray(lp)))
        h = 1e-6
        for (i, j) in [(0, 0), (0, 3), (2, 1), (4, 0)]:
            e = np.zeros_like(lp)
            e[i, j] = h
            fd = (float(f(jnp.asarray(lp + e))) - float(f(jnp.asarray(lp - e)))) / (2 * h)
            assert grad[i, j] == pytest.approx(fd, abs=1e-6)


@pytest.mark.parametrize("lam", [1.3, np.array(1.3), np.array([1.3])])
def test_ppo_lag_multiplier_gets_no_gradient(lam):
    lp, old, a_r, a_c, mask = _actor_inputs(7, "right_padded")
    with x64():
        def f(m):
            return rl.ppo_lag_actor_loss(lp, old, a_r, a_c, mask, multiplier=m, clip_range_ratio=0.2)
        m0 = jnp.asarray(lam, jnp.float64)
        g = jax.grad(f)(m0)
        assert np.all(np.asarray(g) == 0.0)
        # ... although the value does depend on lambda
        assert abs(float(f(m0 + 0.5)) - float(f(m0))) > 1e-4


def test_ppo_lag_with_two_constraints_combines_sum_of_lambdas():
    lp, old, a_r, a_c, mask = _actor_inputs(8, "right_padded")
    a_c2 = np.stack([a_c, -0.5 * a_c + 0.3])
    lam = np.array([0.4, 2.0])
    adv = (a_r - lam[0] * a_c2[0] - lam[1] * a_c2[1]) / (1 + lam.sum())
    want, _ = np_actor_loss_and_grad(lp, old, adv, mask, 0.2)
    with x64():
        got = rl.ppo_lag_actor_loss(lp, old, a_r, a_c2, mask, multiplier=lam, clip_range_ratio=0.2)
    assert float(got) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="multiplier"):
        rl.ppo_lag_actor_loss(lp, old, a_r, a_c2, mask, multiplier=np.ones(3), clip_range_ratio=0.2)


def test_ppo_actor_loss_plain_equals_lag_with_zero_lambda_and_ignores_nan_padding():
    lp, old, a_r, a_c, mask = _actor_inputs(9, "right_padded")
    plain = rl.ppo_actor_loss(lp, old, a_r, mask, clip_range_ratio=0.2)
    lag0 = rl.ppo_lag_actor_loss(lp, old, a_r, a_c, mask, multiplier=0.0, clip_range_ratio=0.2)
    assert float(plain) == pytest.approx(float(lag0), rel=1e-6)
    lp_bad = np.where(mask == 1, lp, np.inf)
    loss, g = jax.value_and_grad(lambda x: rl.ppo_actor_loss(x, old, a_r, mask, clip_range_ratio=0.2))(lp_bad)
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)
    assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------ value loss

def test_value_loss_matches_reference_with_clipping(mask_kind):
    rng = np.random.default_rng(10)
    v, old, g = 3.0 * rng.normal(size=(3, 5, 6))
    mask = make_mask(mask_kind, rng, 5, 6, min_len=1)
    eps = 0.5
    assert (np.abs(v - old) > eps).sum() > 5
    want = np_value_loss(v, old, g, mask, eps)
    with x64():
        got = rl.value_loss(v, old, g, mask, clip_range_value=eps)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # only the current values are differentiated
    gold = jax.grad(lambda o: rl.value_loss(v, o, g, mask, clip_range_value=eps))(jnp.asarray(old, jnp.float32))
    assert np.all(np.asarray(gold) == 0.0)


# ------------------------------------------------------------------ dtypes and jit

def test_rl_stage_functions_jit_and_default_to_float32():
    rng = np.random.default_rng(11)
    b, t = 3, 6
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    lp, ref, v, v_old = (f32(rng.normal(size=(b, t))) for _ in range(4))
    mask = jnp.asarray(right_padded_mask(rng, b, t, min_len=1))
    reward, cost = f32(rng.normal(size=b)), f32(rng.normal(size=b))

    def pipeline(lp, ref, v, v_old, reward, cost, mask, lam):
        r, c = rl.kl_shaped_rewards(reward, cost, lp, ref, mask, kl_coeff=0.01, clip_range_score=50.0)
        ar, gr = rl.gae(v_old, r, mask)
        ac, _ = rl.gae(v_old, c, mask)
        return (rl.ppo_lag_actor_loss(lp, ref, ar, ac, mask, multiplier=lam, clip_range_ratio=0.2),
                rl.value_loss(v, v_old, gr, mask, clip_range_value=5.0),
                rl.masked_mean(r, mask))

    args = (lp, ref, v, v_old, reward, cost, mask, jnp.float32(0.7))
    eager = pipeline(*args)
    jitted = jax.jit(pipeline)(*args)
    for e, j in zip(eager, jitted):
        assert j.dtype == jnp.float32 and j.shape == ()
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-5, atol=1e-6)
    # bf16 inputs compute in float32
    a, _ = rl.gae(v.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask)
    assert a.dtype == jnp.float32


def test_combined_advantages_formula_and_no_gradient_to_lambda():
    a_r = jnp.array([[1.0, -2.0]])
    a_c = jnp.array([[3.0, 0.5]])
    np.testing.assert_allclose(np.asarray(rl.combined_advantages(a_r, a_c, 3.0)), [[-2.0, -0.875]])
    g = jax.grad(lambda lam: jnp.sum(rl.combined_advantages(a_r, a_c, lam)))(jnp.float32(3.0))
    assert float(g) == 0.0


def test_end_index_and_rows_without_tokens_get_no_end_score():
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(rl.end_index(mask)), [1, 2, 0, 3])
    lp = np.zeros((4, 4), np.float32)
    r, c = rl.kl_shaped_rewards(np.full(4, 7.0), np.full(4, -7.0), lp, lp, mask, kl_coeff=0.1,
                                clip_range_score=50.0)
    np.testing.assert_array_equal(np.asarray(r)[2], 0.0)
    np.testing.assert_array_equal(np.asarray(c)[2], 0.0)
    assert float(np.asarray(r)[1, 2]) == 7.0 and float(np.asarray(c)[3, 3]) == -7.0

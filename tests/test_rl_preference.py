"""safejax.rl preference-model losses, metrics, SFT and DPO against float64 numpy loops (SAFE_RLHF.md §4) and torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import last_index, preference_pairs, x64

TOL = dict(rtol=1e-6, atol=1e-6)


def nls(x):
    """-log sigmoid(x), float64, stable."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def kappa(is_safe):
    return -1.0 if is_safe else 1.0


# ------------------------------------------------------------------ sequence-wise

def np_reward_loss(hi, lo, eta):
    b = len(hi)
    loss = sum(nls(hi[i] - lo[i]) for i in range(b)) / b
    reg = (sum(v * v for v in hi) + sum(v * v for v in lo)) / (2 * b)
    return loss + eta * reg


def np_cost_loss(cs, cu, s_safe, u_safe, eta):
    b = len(cs)
    total = 0.0
    for i in range(b):
        total += nls(cu[i] - cs[i]) + nls(kappa(s_safe[i]) * cs[i]) + nls(kappa(u_safe[i]) * cu[i])
    reg = (sum(v * v for v in cs) + sum(v * v for v in cu)) / (2 * b)
    return total / b + eta * reg


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_reward_model_loss_matches_reference(eta):
    rng = np.random.default_rng(0)
    hi, lo = 2.0 * rng.normal(size=(2, 9))
    with x64():
        got = rl.reward_model_loss(hi, lo, regularization=eta)
        assert got.dtype == jnp.float64
    assert float(got) == pytest.approx(np_reward_loss(hi, lo, eta), rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_cost_model_loss_matches_reference_with_sign_terms(eta):
    rng = np.random.default_rng(1)
    cs, cu = 2.0 * rng.normal(size=(2, 12))
    s_safe = rng.random(12) < 0.6
    u_safe = rng.random(12) < 0.3
    with x64():
        got = rl.cost_model_loss(cs, cu, s_safe, u_safe, regularization=eta)
    assert float(got) == pytest.approx(np_cost_loss(cs, cu, s_safe, u_safe, eta), rel=1e-6)


def test_cost_model_loss_sign_term_pushes_unsafe_costs_positive():
    # unsafe/unsafe pair at C = 0: d/dC^s = +0.5 (pairwise) - 0.5 (sign) = 0, d/dC^u = -0.5 - 0.5 = -1
    g_s, g_u = jax.grad(rl.cost_model_loss, argnums=(0, 1))(jnp.array([0.0]), jnp.array([0.0]),
                                                          jnp.array([False]), jnp.array([False]))
    assert (float(g_s[0]), float(g_u[0])) == (pytest.approx(0.0), pytest.approx(-1.0))
    g_s, _ = jax.grad(rl.cost_model_loss, argnums=(0, 1))(jnp.array([0.0]), jnp.array([0.0]),
                                                          jnp.array([True]), jnp.array([False]))
    # safer & safe: pairwise term pushes C^s down (grad +0.5) and sign term pushes it down (grad +0.5)
    assert float(g_s[0]) == pytest.approx(1.0)


def test_preference_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="worse_end_scores"):
        rl.reward_model_loss(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="unsafer_is_safe"):
        rl.cost_model_loss(np.zeros(3), np.zeros(3), np.ones(3, bool), np.ones(2, bool))


# ------------------------------------------------------------------ token-wise

def np_window(ids_a, ids_b, ma, mb, i):
    ea, eb = last_index(ma[i]), last_index(mb[i])
    e = max(ea, eb)
    d = int(np.nonzero(ids_a[i] != ids_b[i])[0][0])
    return d, e, ea, eb


def np_token_reward_loss(sa, sb, ma, mb, ia, ib, eta, bug):
    losses = []
    for i in range(sa.shape[0]):
        d, e, ea, eb = np_window(ia, ib, ma, mb, i)
        if bug:  # the reference: raw scores over [d, E], pads of the shorter sequence included
            xa = [sa[i, t] for t in range(d, e + 1)]
            xb = [sb[i, t] for t in range(d, e + 1)]
            own_a, own_b = xa, xb
        else:  # documented fix: a sequence past its end is represented by its end score
            xa = [sa[i, min(t, ea)] for t in range(d, e + 1)]
            xb = [sb[i, min(t, eb)] for t in range(d, e + 1)]
            own_a = [sa[i, t] for t in range(min(d, ea), ea + 1)]
            own_b = [sb[i, t] for t in range(min(d, eb), eb + 1)]
        loss = sum(nls(p - q) for p, q in zip(xa, xb)) / len(xa)
        reg = (sum(v * v for v in own_a) + sum(v * v for v in own_b)) / (len(own_a) + len(own_b))
        losses.append(loss + eta * reg)
    return sum(losses) / len(losses)


def np_token_cost_loss(ss, su, ms, mu, i_s, i_u, s_safe, u_safe, eta, bug):
    losses = []
    for i in range(ss.shape[0]):
        d, e, es, eu = np_window(i_s, i_u, ms, mu, i)
        if bug:
            xs = [ss[i, t] for t in range(d, e + 1)]
            xu = [su[i, t] for t in range(d, e + 1)]
            own_s, own_u = xs, xu
        else:
            xs = [ss[i, min(t, es)] for t in range(d, e + 1)]
            xu = [su[i, min(t, eu)] for t in range(d, e + 1)]
            own_s = [ss[i, t] for t in range(min(d, es), es + 1)]
            own_u = [su[i, t] for t in range(min(d, eu), eu + 1)]
        loss = sum(nls(u - s) for s, u in zip(xs, xu)) / len(xs)
        loss += sum(nls(kappa(s_safe[i]) * v) for v in own_s) / len(own_s)
        loss += sum(nls(kappa(u_safe[i]) * v) for v in own_u) / len(own_u)
        reg = (sum(v * v for v in own_s) + sum(v * v for v in own_u)) / (len(own_s) + len(own_u))
        losses.append(loss + eta * reg)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("bug", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.2])
def test_token_wise_reward_loss_matches_reference_loop(bug, eta):
    rng = np.random.default_rng(2)
    ia, ib, ma, mb = preference_pairs(rng, 8, 10)
    sa, sb = 2.0 * rng.normal(size=(2, 8, 10))
    want = np_token_reward_loss(sa, sb, ma, mb, ia, ib, eta, bug)
    with x64():
        got = rl.token_wise_reward_model_loss(sa, sb, ma, mb, ia, ib, regularization=eta, include_pad_bug=bug)
        assert got.dtype == jnp.float64
    assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bug", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.2])
def test_token_wise_cost_loss_matches_reference_loop(bug, eta):
    rng = np.random.default_rng(3)
    i_s, i_u, ms, mu = preference_pairs(rng, 8, 10)
    ss, su = 2.0 * rng.normal(size=(2, 8, 10))
    s_safe = rng.random(8) < 0.5
    u_safe = rng.random(8) < 0.5
    want = np_token_cost_loss(ss, su, ms, mu, i_s, i_u, s_safe, u_safe, eta, bug)
    with x64():
        got = rl.token_wise_cost_model_loss(ss, su, ms, mu, i_s, i_u, s_safe, u_safe, regularization=eta,
                                            include_pad_bug=bug)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_token_wise_fixed_mode_ignores_pad_scores_but_bug_mode_does_not():
    rng = np.random.default_rng(4)
    ia, ib, ma, mb = preference_pairs(rng, 8, 10)
    sa, sb = rng.normal(size=(2, 8, 10))
    sa2 = np.where(ma == 1, sa, sa + 100.0)
    sb2 = np.where(mb == 1, sb, sb - 100.0)
    flags = (rng.random(8) < 0.5, rng.random(8) < 0.5)
    for bug, same in [(False, True), (True, False)]:
        r1 = rl.token_wise_reward_model_loss(sa, sb, ma, mb, ia, ib, regularization=0.1, include_pad_bug=bug)
        r2 = rl.token_wise_reward_model_loss(sa2, sb2, ma, mb, ia, ib, regularization=0.1, include_pad_bug=bug)
        c1 = rl.token_wise_cost_model_loss(sa, sb, ma, mb, ia, ib, *flags, regularization=0.1, include_pad_bug=bug)
        c2 = rl.token_wise_cost_model_loss(sa2, sb2, ma, mb, ia, ib, *flags, regularization=0.1,
                                           include_pad_bug=bug)
        assert (abs(float(r1) - float(r2)) < 1e-5) == same
        assert (abs(float(c1) - float(c2)) < 1e-5) == same


def test_token_wise_losses_jit():
    rng = np.random.default_rng(5)
    ia, ib, ma, mb = preference_pairs(rng, 4, 8)
    sa, sb = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 4, 8)))
    f = jax.jit(rl.token_wise_reward_model_loss, static_argnames=("include_pad_bug",))
    for bug in (False, True):
        e = rl.token_wise_reward_model_loss(sa, sb, ma, mb, ia, ib, regularization=0.01, include_pad_bug=bug)
        j = f(sa, sb, ma, mb, ia, ib, regularization=0.01, include_pad_bug=bug)
        assert j.dtype == jnp.float32
        assert float(j) == pytest.approx(float(e), rel=1e-5)


# ------------------------------------------------------------------ metrics

def test_preference_metrics_on_hand_built_pairs():
    better = np.array([1.0, 2.0, 0.5, 3.0])
    worse = np.array([0.0, 2.0, 1.0, -1.0])  # yes, tie (wrong), no, yes
    assert float(rl.reward_accuracy(better, worse)) == 0.5
    safer = np.array([-1.0, 0.5, -2.0, 0.0])
    unsafer = np.array([1.0, 0.2, -1.0, 0.0])  # yes, no, yes, tie
    s_safe = np.array([True, True, True, True])
    u_safe = np.array([False, False, True, False])
    assert float(rl.cost_accuracy(safer, unsafer)) == 0.5
    # safer: ok, wrong, ok, zero=wrong; unsafer: ok, ok, ok, zero=wrong -> 5/8
    assert float(rl.cost_sign_accuracy(safer, unsafer, s_safe, u_safe)) == pytest.approx(5 / 8)
    m = rl.cost_model_metrics(safer, unsafer, s_safe, u_safe)
    assert float(m["accuracy_sign"]) == pytest.approx(5 / 8)
    assert float(m["cost_mean"]) == pytest.approx(np.concatenate([safer, unsafer]).mean(), rel=1e-6)
    assert float(m["cost_std"]) == pytest.approx(np.concatenate([safer, unsafer]).std(), rel=1e-6)
    r = jax.jit(rl.reward_model_metrics)(better, worse)
    assert float(r["accuracy"]) == 0.5
    assert float(r["better_reward_mean"]) == pytest.approx(better.mean())


# ------------------------------------------------------------------ log-probs and SFT (torch reference)

def test_log_probs_and_sft_loss_match_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    b, t, v = 3, 5, 7
    logits = 3.0 * rng.normal(size=(b, t, v))
    labels = rng.integers(0, v, size=(b, t))
    labels[0, :2] = -100
    labels[2, 3:] = -100
    tl = torch.tensor(logits, dtype=torch.float64)
    want_lp = torch.log_softmax(tl, -1).gather(-1, torch.tensor(np.maximum(labels, 0))[..., None])[..., 0].numpy()
    want_loss = torch.nn.functional.cross_entropy(tl.reshape(-1, v), torch.tensor(labels).reshape(-1),
                                                  ignore_index=-100).item()
    with x64():
        lp = rl.log_probs_from_logits(logits, labels)
        loss = rl.sft_loss(logits, labels, labels != -100)
        loss_default = rl.sft_loss(logits, labels)
    valid = labels != -100
    np.testing.assert_allclose(np.asarray(lp)[valid], want_lp[valid], **TOL)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    assert float(loss_default) == pytest.approx(want_loss, rel=1e-6)
    # bf16 logits are promoted to float32
    assert rl.log_probs_from_logits(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32


# ------------------------------------------------------------------ DPO

def np_dpo(lp_b, lp_w, ref_b, ref_w, ib, iw, mb, mw, beta, bug):
    losses, rb, rw = [], [], []
    n = lp_b.shape[1]
    for i in range(lp_b.shape[0]):
        d = int(np.nonzero(ib[i] != iw[i])[0][0])
        eb, ew = last_index(mb[i]), last_index(mw[i])
        if bug:
            sl_b, sl_w = range(d, min(eb + 1, n)), range(d, min(ew + 1, n))
        else:
            sl_b, sl_w = range(d - 1, eb), range(d - 1, ew)
        xb = sum(lp_b[i, j] - ref_b[i, j] for j in sl_b)
        xw = sum(lp_w[i, j] - ref_w[i, j] for j in sl_w)
        losses.append(nls(beta * (xb - xw)))
        rb.append(xb)
        rw.append(xw)
    return sum(losses) / len(losses), np.array(rb), np.array(rw)


@pytest.mark.parametrize("bug", [False, True])
def test_dpo_loss_matches_reference_loop_in_both_window_modes(bug):
    rng = np.random.default_rng(7)
    ib, iw, mb, mw = preference_pairs(rng, 8, 10)
    lp_b, lp_w, ref_b, ref_w = rng.normal(size=(4, 8, 9))
    want, want_rb, want_rw = np_dpo(lp_b, lp_w, ref_b, ref_w, ib, iw, mb, mw, 0.1, bug)
    with x64():
        got = rl.dpo_window_loss(lp_b, lp_w, ref_b, ref_w, ib, iw, mb, mw, scale_coeff=0.1, reference_window_bug=bug)
        rb, rw = rl.dpo_log_ratios(lp_b, lp_w, ref_b, ref_w, ib, iw, mb, mw, reference_window_bug=bug)
    assert float(got) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(rb), want_rb, **TOL)
    np.testing.assert_allclose(np.asarray(rw), want_rw, **TOL)


def test_dpo_fixed_window_scores_exactly_the_divergent_response_tokens():
    # ids: shared [5, 6], better continues [7, 8], worse [9]; log-prob j scores token j+1
    ib = np.array([[5, 6, 7, 8, 0]])
    iw = np.array([[5, 6, 9, 0, 0]])
    mb, mw = (ib != 0).astype(int), (iw != 0).astype(int)
    lp_b = np.array([[0.0, 1.0, 10.0, 100.0]])  # 7 scored at j=1, 8 at j=2 (100 at j=3 is the pad)
    lp_w = np.array([[0.0, 2.0, 20.0, 200.0]])  # 9 scored at j=1
    zero = np.zeros_like(lp_b)
    rb, rw = rl.dpo_log_ratios(lp_b, lp_w, zero, zero, ib, iw, mb, mw)
    assert (float(rb[0]), float(rw[0])) == (11.0, 2.0)
    rb, rw = rl.dpo_log_ratios(lp_b, lp_w, zero, zero, ib, iw, mb, mw, reference_window_bug=True)
    assert (float(rb[0]), float(rw[0])) == (110.0, 20.0)

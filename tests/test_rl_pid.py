"""safejax.rl PID Lagrange multiplier against a float64 NumPy transcription of the PID equations with a real
collections.deque for both the episode-cost window and the derivative history."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import x64


class NumpyPID:
    """One constraint: deque(maxlen=W) of costs; I, P, D, deque H(maxlen=d_delay) starting as [0.0]."""

    def __init__(self, *, window, d_delay, lambda_init, threshold, kp, ki, kd, a_p, a_d, lambda_max):
        self.window = collections.deque(maxlen=window)
        self.hist = collections.deque([0.0], maxlen=d_delay)
        self.i, self.p, self.d, self.lam = lambda_init, 0.0, 0.0, lambda_init
        self.thr, self.kp, self.ki, self.kd, self.a_p, self.a_d = threshold, kp, ki, kd, a_p, a_d
        self.lambda_max = lambda_max
        self.clamped = {"i": False, "lam0": False, "max": False, "dpos": False, "dzero": False}

    def update(self, costs):
        self.window.extend(float(c) for c in costs)
        j = sum(self.window) / len(self.window)
        delta = j - self.thr
        if self.i + self.ki * delta < 0:
            self.clamped["i"] = True
        self.i = max(0.0, self.i + self.ki * delta)
        self.p = self.a_p * self.p + (1 - self.a_p) * delta
        self.d = self.a_d * self.d + (1 - self.a_d) * j
        pid_d = max(0.0, self.d - self.hist[0])
        self.clamped["dpos" if pid_d > 0 else "dzero"] = True
        out = self.kp * self.p + self.i + self.kd * pid_d
        if out < 0:
            self.clamped["lam0"] = True
        self.lam = max(0.0, out)
        if self.lambda_max is not None and self.lam > self.lambda_max:
            self.clamped["max"] = True
            self.lam = min(self.lam, self.lambda_max)
        self.hist.append(self.d)


def _cost_stream(rng, k, n_updates):
    """[K, B] batches whose mean drifts above, then below, then above the threshold (so every clamp is hit)."""
    shifts = np.concatenate([np.full(n_updates // 3, 2.0), np.full(n_updates // 3, -3.0),
                             np.full(n_updates - 2 * (n_updates // 3), 1.0)])
    sizes = rng.integers(1, 9, size=n_updates)
    return [rng.normal(loc=s + 0.5 * np.arange(k)[:, None], scale=1.5, size=(k, n)) for s, n in zip(shifts, sizes)]


@pytest.mark.parametrize("k,lambda_max,d_delay", [(1, None, 10), (1, 2.5, 3), (3, None, 1), (3, 2.5, 10)])
def test_pid_update_matches_numpy_deque_equations_over_dozens_of_updates(k, lambda_max, d_delay):
    rng = np.random.default_rng(k * 10 + d_delay)
    w, n_updates = 11, 48
    thr = np.array([0.1, -0.3, 0.5])[:k]
    kp, ki, kd = np.array([0.7, 0.3, 1.1])[:k], 0.15, np.array([2.0, 0.5, 1.0])[:k]
    refs = [NumpyPID(window=w, d_delay=d_delay, lambda_init=0.2, threshold=thr[i], kp=kp[i], ki=ki, kd=kd[i],
                     a_p=0.9, a_d=0.8, lambda_max=lambda_max) for i in range(k)]
    with x64():
        state = rl.pid_lagrange_init(num_constraints=k, window_size=w, d_delay=d_delay, lambda_init=0.2,
                                     dtype=jnp.float64)
        np.testing.assert_array_equal(np.asarray(rl.multiplier(state)), np.full(k, 0.2))
        # batches of 1..8 costs padded to 8 rows with a row mask: one compile for the whole sequence
        update = jax.jit(lambda st, c, v: rl.pid_lagrange_update(st, c, threshold=thr, kp=kp, ki=ki, kd=kd,
                                                                 delta_p_ema=0.9, delta_d_ema=0.8,
                                                                 lambda_max=lambda_max, valid=v))
        for costs in _cost_stream(rng, k, n_updates):
            for i in range(k):
                refs[i].update(costs[i])
            n = costs.shape[1]
            padded = np.concatenate([costs, np.full((k, 8 - n), 1e6)], axis=1)  # padding would show in J
            arg = padded[0] if k == 1 else padded
            state = update(state, jnp.asarray(arg), jnp.arange(8) < n)
            lam = np.asarray(rl.multiplier(state))
            assert lam.shape == (k,) and lam.dtype == np.float64
            np.testing.assert_allclose(lam, [r.lam for r in refs], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np.asarray(state.integral), [r.i for r in refs], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np.asarray(rl.episode_cost_mean(state)), [np.mean(r.window) for r in refs],
                                       rtol=1e-10)
    assert int(state.step) == n_updates
    hit = {key: any(r.clamped[key] for r in refs) for key in refs[0].clamped}
    assert hit["i"] and hit["dpos"] and hit["dzero"], hit  # the I clamp and both branches of the D term ran
    assert hit["max"] == (lambda_max is not None)


def test_pid_multiplier_is_lambda_init_before_first_update_and_sgd_multiplier_unchanged():
    pid = rl.pid_lagrange_init(num_constraints=2, lambda_init=[0.001, 0.5])
    np.testing.assert_allclose(np.asarray(rl.multiplier(pid)), [0.001, 0.5], rtol=1e-7)
    sgd = rl.lagrange_init(1.7, num_constraints=2)
    np.testing.assert_allclose(np.asarray(rl.multiplier(sgd)), [1.7, 1.7], rtol=1e-6)
    assert rl.multiplier(sgd).shape == rl.multiplier(pid).shape == (2,)


def test_pid_first_update_from_lambda_init_by_hand():
    # J = 2, threshold 0.5: delta = 1.5; I = 0.001 + 0.1 * 1.5; P = 0.05 * 1.5; D = 0.05 * 2; dD = D - 0
    with x64():
        s = rl.pid_lagrange_init(lambda_init=0.001, dtype=jnp.float64)
        s = rl.pid_lagrange_update(s, jnp.array([1.0, 3.0]), threshold=0.5, kp=2.0, ki=0.1, kd=3.0)
        want = 2.0 * 0.075 + (0.001 + 0.15) + 3.0 * 0.1
        assert float(rl.multiplier(s)[0]) == pytest.approx(want, rel=1e-12)


def test_pid_update_skips_while_window_is_empty():
    s = rl.pid_lagrange_init(num_constraints=1, lambda_init=0.3)
    s2 = rl.pid_lagrange_update(s, jnp.array([5.0, 6.0]), threshold=0.0, kp=1.0, ki=1.0, kd=1.0,
                                valid=jnp.array([False, False]))
    assert int(s2.step) == 1 and int(s2.window_count) == 0
    for name in ("lam", "integral", "delta_p", "cost_d", "cost_d_history"):
        np.testing.assert_array_equal(np.asarray(getattr(s2, name)), np.asarray(getattr(s, name)))


def test_pid_update_jits_with_donated_state_and_equals_eager():
    rng = np.random.default_rng(3)
    batches = rng.normal(size=(12, 3, 4)).astype(np.float32)
    kw = dict(threshold=0.2, kp=0.5, ki=0.05, kd=0.5, lambda_max=4.0)
    traces = []

    def update(st, c):
        traces.append(1)  # runs once per trace: one compile for the whole sequence
        return rl.pid_lagrange_update(st, c, **kw)

    step = jax.jit(update, donate_argnums=0)
    eager = rl.pid_lagrange_init(num_constraints=3, window_size=16)
    jitted = rl.pid_lagrange_init(num_constraints=3, window_size=16)
    for c in batches:
        eager = rl.pid_lagrange_update(eager, jnp.asarray(c), **kw)
        jitted = step(jitted, jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(rl.multiplier(jitted)), np.asarray(rl.multiplier(eager)), rtol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_constraints=0), "num_constraints"), (dict(d_delay=0), "d_delay"), (dict(window_size=0), "window_size"),
    (dict(lambda_init=-0.1), "lambda_init"), (dict(num_constraints=2, lambda_init=[1.0, 2.0, 3.0]), "lambda_init"),
])
def test_pid_init_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rl.pid_lagrange_init(**kwargs)


def test_pid_update_rejects_wrong_constraint_shapes():
    s = rl.pid_lagrange_init(num_constraints=3)
    with pytest.raises(ValueError, match="episode_costs"):
        rl.pid_lagrange_update(s, jnp.zeros((4,)), threshold=0.0, kp=1.0, ki=1.0, kd=1.0)
    with pytest.raises(ValueError, match="threshold"):
        rl.pid_lagrange_update(s, jnp.zeros((3, 4)), threshold=jnp.zeros(2), kp=1.0, ki=1.0, kd=1.0)


def _toy_run(rule, seed, n=400):
    """The module docstring's toy process: mean cost relaxes towards 1.5 - 1.2 lambda; 16 costs per update."""
    rng = np.random.default_rng(seed)
    mu, mus = 1.5, []
    if rule == "pid":
        state = rl.pid_lagrange_init(window_size=128, lambda_init=0.001)
        update = jax.jit(lambda s, c: rl.pid_lagrange_update(s, c, threshold=0.0, **rl.SUGGESTED_PID_GAINS))
    else:
        state = rl.lagrange_init(1.0, window_size=128)
        update = jax.jit(lambda s, c: rl.lagrange_update(s, c, threshold=0.0, lambda_lr=0.1))
    for _ in range(n):
        lam = float(rl.multiplier(state)[0])
        mu += 0.05 * ((1.5 - 1.2 * lam) - mu)
        mus.append(mu)
        state = update(state, jnp.asarray(rng.normal(mu, 1.0, 16), jnp.float32))
    mus = np.array(mus)
    return np.sum(np.maximum(0.0, mus)), np.mean(mus[-n // 5:])


def test_suggested_pid_gains_violate_less_than_sgd_and_settle_near_threshold_on_toy_cost_process():
    pid_violation, pid_final = _toy_run("pid", seed=0)
    sgd_violation, _ = _toy_run("sgd", seed=0)
    assert pid_violation < 0.5 * sgd_violation
    assert abs(pid_final) < 0.1


def test_pid_init_works_under_eval_shape_with_a_traced_lambda_init():
    shapes = jax.eval_shape(lambda lam: rl.pid_lagrange_init(num_constraints=2, d_delay=4, window_size=8,
                                                             lambda_init=lam), jnp.zeros(2))
    assert shapes.lam.shape == (2,) and shapes.cost_d_history.shape == (2, 4) and shapes.cost_window.shape == (2, 8)

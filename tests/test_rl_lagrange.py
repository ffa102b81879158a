"""safejax.rl Lagrange multiplier against a float64 numpy simulation with collections.deque (SAFE_RLHF.md §5.7)."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safejax.rl as rl
from test_rl_helpers import x64


class NumpyLagrange:
    """The reference: deque(maxlen=W) of episode costs; SGD on log-lambda; clamp; delay on the call count."""

    def __init__(self, lambda_init, window, lr, threshold, lambda_max=None, delay=0):
        self.log_lambda = math.log(lambda_init)
        self.window = collections.deque(maxlen=window)
        self.lr, self.threshold, self.lambda_max, self.delay = lr, threshold, lambda_max, delay
        self.global_step = 0

    def update(self, costs):
        self.window.extend(float(c) for c in costs)
        if self.global_step >= self.delay and len(self.window) > 0:
            jbar = sum(self.window) / len(self.window)
            # d/dlog_lambda of -(J - thr) * exp(log_lambda) = -(J - thr) * lambda; SGD subtracts lr * grad
            self.log_lambda -= self.lr * (-(jbar - self.threshold) * math.exp(self.log_lambda))
            if self.lambda_max is not None:
                self.log_lambda = min(self.log_lambda, math.log(self.lambda_max))
        self.global_step += 1


def _batches(rng, sizes, shift=0.0):
    return [rng.normal(loc=shift, scale=2.0, size=n) for n in sizes]


@pytest.mark.parametrize("lambda_max,delay", [(None, 0), (1.6, 0), (None, 3), (1.6, 2)])
def test_lagrange_update_sequence_matches_deque_simulation(lambda_max, delay):
    rng = np.random.default_rng(0)
    w = 7
    sizes = [3, 5, 2, 9, 4, 1, 6, 3, 8, 2]  # 9 > W: a batch larger than the window; several wrap-arounds
    batches = _batches(rng, sizes[:5], shift=1.5) + _batches(rng, sizes[5:], shift=-2.5)
    ref = NumpyLagrange(1.2, w, 0.3, 0.25, lambda_max=lambda_max, delay=delay)
    clamped = False
    with x64():
        state = rl.lagrange_init(1.2, window_size=w, lambda_lr=0.3, dtype=jnp.float64)
        assert state.log_lambda.dtype == jnp.float64
        for costs in batches:
            ref.update(costs)
            state = rl.lagrange_update(state, jnp.asarray(costs), threshold=0.25, lambda_lr=0.3,
                                       lambda_max=lambda_max, update_delay_steps=delay)
            np.testing.assert_allclose(float(state.log_lambda[0]), ref.log_lambda, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(float(rl.episode_cost_mean(state)[0]), np.mean(ref.window), rtol=1e-9)
            valid = np.asarray(state.cost_window[0, : int(state.window_count)])
            np.testing.assert_allclose(np.sort(valid), np.sort(np.array(ref.window)), rtol=0, atol=0)
            assert int(state.window_count) == len(ref.window)
            clamped |= lambda_max is not None and math.isclose(ref.log_lambda, math.log(lambda_max))
    assert int(state.step) == len(batches)
    if lambda_max is not None:
        assert clamped, "the lambda_max clamp should have been active at least once"
        assert float(rl.multiplier(state)[0]) <= lambda_max + 1e-12


def test_lagrange_delay_keeps_lambda_fixed_but_still_records_costs():
    state = rl.lagrange_init(1.0, window_size=4)
    for i in range(3):
        state = rl.lagrange_update(state, jnp.full((2,), 5.0), threshold=0.0, lambda_lr=0.1, update_delay_steps=3)
        assert float(rl.multiplier(state)[0]) == 1.0
        assert int(state.step) == i + 1
    assert int(state.window_count) == 4
    state = rl.lagrange_update(state, jnp.full((2,), 5.0), threshold=0.0, lambda_lr=0.1, update_delay_steps=3)
    assert float(rl.multiplier(state)[0]) == pytest.approx(math.exp(0.1 * 5.0), rel=1e-6)


def test_lambda_rises_above_threshold_and_falls_below():
    state = rl.lagrange_init(1.0, window_size=8)
    lams = []
    for _ in range(6):
        state = rl.lagrange_update(state, jnp.full((4,), 2.0), threshold=1.0, lambda_lr=0.05)
        lams.append(float(rl.multiplier(state)[0]))
    assert all(b > a for a, b in zip([1.0] + lams, lams))
    for _ in range(8):
        state = rl.lagrange_update(state, jnp.full((4,), -1.0), threshold=1.0, lambda_lr=0.05)
        lams.append(float(rl.multiplier(state)[0]))
    assert lams[-1] < lams[-2] < lams[-3] and lams[-1] > 0
    assert int(np.argmax(lams)) == 5  # peaks at the crossover: the first window mean below the threshold


def test_lagrange_two_constraints_are_independent_and_jit():
    rng = np.random.default_rng(1)
    thr = np.array([0.5, -1.0])
    refs = [NumpyLagrange(l0, 5, 0.2, t, lambda_max=3.0) for l0, t in zip([0.5, 2.0], thr)]

    @jax.jit
    def update(state, costs, thr, lr, delay):  # threshold, lr and delay may be traced arrays
        return rl.lagrange_update(state, costs, threshold=thr, lambda_lr=lr, lambda_max=3.0,
                                  update_delay_steps=delay)

    with x64():
        state = rl.lagrange_init(jnp.array([0.5, 2.0]), num_constraints=2, window_size=5, dtype=jnp.float64)
        assert state.log_lambda.shape == (2,) and state.cost_window.shape == (2, 5)
        for n in [3, 3, 4, 3, 3]:
            costs = rng.normal(size=(2, n))
            for k in range(2):
                refs[k].update(costs[k])
            state = update(state, jnp.asarray(costs), jnp.asarray(thr), jnp.asarray(0.2), jnp.asarray(0))
            np.testing.assert_allclose(np.asarray(state.log_lambda), [r.log_lambda for r in refs], rtol=1e-9)
            np.testing.assert_allclose(np.asarray(rl.episode_cost_mean(state)), [np.mean(r.window) for r in refs],
                                       rtol=1e-9)
    assert rl.multiplier(state).shape == (2,)
    with pytest.raises(ValueError, match="episode_costs"):
        rl.lagrange_record(state, jnp.zeros(3))


def test_lagrange_record_valid_rows_and_empty_window_step():
    state = rl.lagrange_init(2.0, window_size=3)
    same = rl.lagrange_step(state, threshold=0.0, lambda_lr=0.5)  # empty window: no update, step counts
    assert float(rl.multiplier(same)[0]) == pytest.approx(2.0) and int(same.step) == 1
    dq = collections.deque(maxlen=3)
    rng = np.random.default_rng(2)
    for n in [4, 2, 5]:
        costs = rng.normal(size=n).astype(np.float32)
        valid = rng.random(n) < 0.6
        dq.extend(costs[valid])
        state = jax.jit(rl.lagrange_record)(state, costs, valid)
        assert int(state.window_count) == len(dq)
        np.testing.assert_allclose(np.sort(np.asarray(state.cost_window[0, : len(dq)])), np.sort(np.array(dq)))
        assert float(rl.episode_cost_mean(state)[0]) == pytest.approx(np.mean(dq) if dq else 0.0, rel=1e-6)


def test_lagrange_state_dtypes_and_defaults():
    state = rl.lagrange_init(1.0)
    assert state.log_lambda.dtype == jnp.float32 and state.cost_window.shape == (1, 128)
    assert state.window_count.dtype == jnp.int32 and state.window_pos.dtype == jnp.int32
    assert state.step.dtype == jnp.int32


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), [1.0, 2.0, 3.0]])
def test_lagrange_init_rejects_nonpositive_lambda(bad):
    with pytest.raises(ValueError, match="lambda_init"):
        rl.lagrange_init(bad, num_constraints=2)

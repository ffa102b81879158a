"""PID Lagrange multiplier (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID Lagrangian Methods").

The arithmetic follows the authors' code and omnisafe's ``PIDLagrangian.pid_update``. Per constraint ``k``, with
``J`` the mean of the episode-cost window and ``delta = J - threshold``, one update does::

    I   <- max(0, I + ki * delta)                 # I starts at lambda_init
    P   <- a_p * P + (1 - a_p) * delta            # P starts at 0
    D   <- a_d * D + (1 - a_d) * J                # D starts at 0
    dD  =  max(0, D - H[0])                       # H: deque(maxlen=d_delay), starts as [0.0]
    lam =  max(0, kp * P + I + kd * dD)
    lam =  min(lam, lambda_max)                   # only when lambda_max is set
    H.append(D)                                   # after the update

Before the first update ``lam = lambda_init``. The episode-cost window is the SGD rule's ring buffer
(:func:`safejax.rl.lagrange_record`, :func:`safejax.rl.episode_cost_mean` work on both states).

The deque ``H`` is kept as a fixed ``[K, d_delay]`` shift register initialised with zeros: a deque that starts as
``[0.0]`` and has received ``n`` values holds ``[0.0, D_1, ..., D_n]`` until it is full, so its oldest entry is
0.0 exactly as long as the register's first slot still holds an initial zero, and both hold ``D_{n-d+1..n}`` once
``n >= d_delay``.

Gains for Safe RLHF's cost scale
--------------------------------
omnisafe's defaults (``kp=0.1, ki=0.01, kd=0.01``, ``lambda_init=0.001``) are tuned for episode costs near 25 with
one update per epoch. Safe RLHF's episode costs are cost-model end scores of order 1 around a threshold near 0,
and the multiplier is updated every micro-step (hundreds to thousands of updates per run), where the SGD rule
(``lambda_lr=0.1`` on log lambda, ``lambda_init=1``) moves lambda by about ``0.1 * lambda * delta`` per update.
We suggest ``kp=0.5, ki=0.05, kd=0.5`` (with the defaults ``d_delay=10``, ``delta_p_ema=delta_d_ema=0.95``,
``lambda_init=0.001``): the integral climbs by 0.05 per update at a violation of 1, the proportional term reacts
at once to the EMA-smoothed violation and falls as soon as the cost drops below the threshold, and the derivative
term pushes against a rising cost. Chosen on a toy cost process (NumPy, 5 seeds, 400 updates): the policy's mean
cost ``mu`` relaxes towards ``1.5 - 1.2 * lam`` at rate 0.05 per update, each update records 16 costs
``~ N(mu, 1)`` into a 128-cost window, threshold 0. Means over seeds of (violation ``sum_t max(0, mu_t)``,
mean of ``-mu`` over the last 20% of updates, lambda peak):

- SGD on log lambda (lr 0.1, lambda_init 1): 312, -0.62 (still oscillating, spread 0.72), 98 (diverging swings);
- PID, omnisafe gains (0.1, 0.01, 0.01): 120, 0.002, 1.28 (settles, but slowly);
- PID, suggested gains (0.5, 0.05, 0.5): 32, 0.019, 1.80;
- PID (1.0, 0.02, 0.5): 58, 0.006, 1.39.

On a slower process (rate 0.02, target ``2 - 0.5 * lam``) the suggested gains gave 101, -0.001, 5.4 against
367, -0.26, 3.8 for omnisafe's; on a faster one (rate 0.1, target ``1 - 2 * lam``) 20, 0.020, 0.84 against SGD's
14, 0.018, 1.53. ``ki`` scales with the number of updates per run: halve it when updates are twice as frequent.
``tests/test_rl_pid.py`` reruns the first toy process with these functions (PID against SGD on log lambda).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from safejax.rl.lagrange import episode_cost_mean, lagrange_record

# Suggested gains for Safe RLHF's O(1) costs (see the module docstring).
SUGGESTED_PID_GAINS = {"kp": 0.5, "ki": 0.05, "kd": 0.5}


class PIDLagrangeState(NamedTuple):
    """Explicit state of the PID multiplier(s) (a pytree; checkpoint it as is).

    Attributes:
      lam: ``[K]`` current multipliers (``lambda_init`` before the first update).
      integral: ``[K]`` I term (starts at ``lambda_init``).
      delta_p: ``[K]`` EMA of the violation ``J - threshold`` (starts at 0).
      cost_d: ``[K]`` EMA of the window mean ``J`` (starts at 0).
      cost_d_history: ``[K, d_delay]`` shift register of past ``cost_d`` values, oldest first (starts at zeros,
        which equals omnisafe's deque ``[0.0]`` of maxlen ``d_delay``; see the module docstring).
      cost_window: ``[K, W]`` ring buffer of episode costs (as :class:`safejax.rl.LagrangeState`).
      window_count: ``[]`` int32, number of valid window entries (``<= W``).
      window_pos: ``[]`` int32, next write index of the ring buffer.
      step: ``[]`` int32, number of :func:`pid_lagrange_step` calls so far.
    """

    lam: jax.Array
    integral: jax.Array
    delta_p: jax.Array
    cost_d: jax.Array
    cost_d_history: jax.Array
    cost_window: jax.Array
    window_count: jax.Array
    window_pos: jax.Array
    step: jax.Array


def pid_lagrange_init(*, num_constraints=1, window_size=128, d_delay=10, lambda_init=0.001, dtype=jnp.float32):
    """Create a :class:`PIDLagrangeState`.

    Args:
      num_constraints: K.
      window_size: W, the episode-cost window (Safe RLHF: 128).
      d_delay: length of the deque of past ``cost_d`` values the derivative term compares with.
      lambda_init: initial lambda >= 0 (and initial I); a number or a length-K sequence.
      dtype: float dtype of the state (float32; float64 needs x64 enabled).
    Returns:
      PIDLagrangeState with ``lam = integral = lambda_init`` ``[K]``, zero EMAs, a zero ``[K, d_delay]`` history,
      an empty ``[K, W]`` window and counters at 0.
    Raises:
      ValueError: if K, W or d_delay < 1, or lambda_init is negative, not finite, or not of length 1 or K.
    """
    k, w, d = int(num_constraints), int(window_size), int(d_delay)
    for name, v in (("num_constraints", k), ("window_size", w), ("d_delay", d)):
        if v < 1:
            raise ValueError(f"safejax.rl.pid_lagrange_init: {name} must be >= 1, got {v}")
    try:
        concrete = np.asarray(lambda_init, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None  # traced (e.g. under jax.eval_shape): checked by shape only
    shape = tuple(concrete.shape) if concrete is not None else tuple(jnp.shape(lambda_init))
    if len(shape) > 1 or int(np.prod(shape)) not in (1, k):
        raise ValueError(f"safejax.rl.pid_lagrange_init: lambda_init must be a number or have {k} entries, "
                         f"got shape {list(shape)}")
    if concrete is not None and (not np.all(np.isfinite(concrete)) or np.any(concrete < 0)):
        raise ValueError(f"safejax.rl.pid_lagrange_init: lambda_init must be >= 0, got {concrete.tolist()}")
    lam = jnp.broadcast_to(jnp.asarray(lambda_init, dtype).reshape(-1), (k,))
    # distinct buffers for every leaf: a train step that donates the state must not see one buffer twice
    return PIDLagrangeState(
        lam=jnp.array(lam, copy=True), integral=jnp.array(lam, copy=True),
        delta_p=jnp.zeros((k,), dtype), cost_d=jnp.zeros((k,), dtype),
        cost_d_history=jnp.zeros((k, d), dtype),
        cost_window=jnp.zeros((k, w), dtype),
        window_count=jnp.zeros((), jnp.int32),
        window_pos=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def _per_constraint(fn, name, x, k, dtype):
    x = jnp.asarray(x, dtype)
    if x.ndim > 1 or x.size not in (1, k):
        raise ValueError(f"safejax.rl.{fn}: {name} must be a scalar or [{k}], got shape {list(x.shape)}")
    return jnp.broadcast_to(x.reshape(-1), (k,))


def pid_lagrange_step(state, *, threshold, kp, ki, kd, delta_p_ema=0.95, delta_d_ema=0.95, lambda_max=None):
    """One PID update from the current window (the equations of the module docstring).

    The update is skipped (state unchanged but ``step + 1``) while the window is empty, e.g. when every row of
    the batches recorded so far was masked out.

    Args:
      state: PIDLagrangeState.
      threshold: scalar or ``[K]`` cost threshold.
      kp, ki, kd: proportional, integral and derivative gains; scalars or ``[K]``.
      delta_p_ema: a_p, EMA factor of the P term. delta_d_ema: a_d, EMA factor of the D term.
      lambda_max: None (no cap; a static Python choice) or a number / ``[K]`` cap on lambda.
    Returns:
      the new PIDLagrangeState.
    """
    fn = "pid_lagrange_step"
    k = state.lam.shape[0]
    dtype = state.lam.dtype
    thr = _per_constraint(fn, "threshold", threshold, k, dtype)
    kp, ki, kd = (_per_constraint(fn, n, v, k, dtype) for n, v in (("kp", kp), ("ki", ki), ("kd", kd)))
    a_p = _per_constraint(fn, "delta_p_ema", delta_p_ema, k, dtype)
    a_d = _per_constraint(fn, "delta_d_ema", delta_d_ema, k, dtype)
    j = jax.lax.stop_gradient(episode_cost_mean(state)).astype(dtype)
    delta = j - thr
    integral = jnp.maximum(0.0, state.integral + ki * delta)
    delta_p = a_p * state.delta_p + (1.0 - a_p) * delta
    cost_d = a_d * state.cost_d + (1.0 - a_d) * j
    pid_d = jnp.maximum(0.0, cost_d - state.cost_d_history[:, 0])
    lam = jnp.maximum(0.0, kp * delta_p + integral + kd * pid_d)
    if lambda_max is not None:
        lam = jnp.minimum(lam, _per_constraint(fn, "lambda_max", lambda_max, k, dtype))
    history = jnp.concatenate([state.cost_d_history[:, 1:], cost_d[:, None]], axis=1)
    do = state.window_count > 0

    def pick(new, old):
        return jnp.where(do, new, old).astype(old.dtype)

    return state._replace(lam=pick(lam, state.lam), integral=pick(integral, state.integral),
                          delta_p=pick(delta_p, state.delta_p), cost_d=pick(cost_d, state.cost_d),
                          cost_d_history=pick(history, state.cost_d_history),
                          step=(state.step + 1).astype(jnp.int32))


def pid_lagrange_update(state, episode_cost, *, threshold, kp, ki, kd, delta_p_ema=0.95, delta_d_ema=0.95,
                        lambda_max=None, valid=None):
    """:func:`safejax.rl.lagrange_record` the batch's episode costs, then one :func:`pid_lagrange_step` (the same
    order and call site as the SGD rule's :func:`safejax.rl.lagrange_update`).

    Args:
      state: PIDLagrangeState.
      episode_cost: ``[B]`` (K = 1) or ``[K, B]`` raw cost-model end scores (no KL).
      threshold, kp, ki, kd, delta_p_ema, delta_d_ema, lambda_max: as :func:`pid_lagrange_step`.
      valid: optional ``[B]`` bool row mask (rows with False are not recorded).
    Returns:
      the new PIDLagrangeState; ``safejax.rl.multiplier(state)`` is the new ``[K]`` lambda.
    """
    state = lagrange_record(state, episode_cost, valid=valid)
    return pid_lagrange_step(state, threshold=threshold, kp=kp, ki=ki, kd=kd, delta_p_ema=delta_p_ema,
                             delta_d_ema=delta_d_ema, lambda_max=lambda_max)

"""Lagrange multiplier for PPO-Lagrangian: SGD on log-lambda over a moving window of episode costs.

ALGORITHM.md §5.7 [code]: ``log_lambda <- log_lambda + lr * lambda * (Jbar_C - threshold)`` (one ``optax.sgd`` step
on ``Loss = -(Jbar_C - threshold) * exp(log_lambda)``), then ``log_lambda <= log(lambda_max)`` when set, only once
``step >= update_delay_steps``. ``Jbar_C`` is the mean of the last ``window_size`` episode costs (a ring buffer that
already holds the current batch). A leading constraint axis ``K`` (K = 1 for Safe RLHF) lets one state carry several
independent multipliers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class LagrangeState(NamedTuple):
    """Explicit state of the Lagrange multiplier(s) (a pytree; checkpoint it as is).

    Attributes:
      log_lambda: ``[K]`` log of the multipliers.
      opt_state: ``optax.sgd`` state for ``log_lambda`` (empty for plain SGD).
      cost_window: ``[K, W]`` ring buffer of episode costs; only the first ``window_count`` slots are valid until
        the buffer has wrapped.
      window_count: ``[]`` int32, number of valid entries (``<= W``).
      window_pos: ``[]`` int32, next write index of the ring buffer.
      step: ``[]`` int32, number of :func:`lagrange_step` calls so far (compared with ``update_delay_steps``).
    """

    log_lambda: jax.Array
    opt_state: Any
    cost_window: jax.Array
    window_count: jax.Array
    window_pos: jax.Array
    step: jax.Array


def lagrange_init(lambda_init, *, num_constraints=1, window_size=128, lambda_lr=0.1, dtype=jnp.float32):
    """Create a :class:`LagrangeState`.

    Args:
      lambda_init: initial lambda > 0; a number, or a length-K sequence/array.
      num_constraints: K.
      window_size: W, the episode-cost window (reference ``episode_cost_window_size`` = 128).
      lambda_lr: learning rate used to build the ``optax.sgd`` state (plain SGD keeps no per-lr state; the rate
        actually applied is the one passed to :func:`lagrange_step`).
      dtype: float dtype of ``log_lambda`` and the window (float32; float64 needs x64 enabled).
    Returns:
      LagrangeState with ``log_lambda = log(lambda_init)`` ``[K]``, an empty window ``[K, W]`` and counters at 0.
    Raises:
      ValueError: if lambda_init <= 0 (or not finite), its length is not 1 or K, or K / W < 1.
    """
    k = int(num_constraints)
    w = int(window_size)
    if k < 1:
        raise ValueError(f"safejax.rl.lagrange_init: num_constraints must be >= 1, got {num_constraints}")
    if w < 1:
        raise ValueError(f"safejax.rl.lagrange_init: window_size must be >= 1, got {window_size}")
    try:
        concrete = np.asarray(lambda_init, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None:
        if concrete.size not in (1, k) or concrete.ndim > 1:
            raise ValueError(f"safejax.rl.lagrange_init: lambda_init must be a number or have {k} entries, "
                             f"got shape {list(concrete.shape)}")
        if not np.all(np.isfinite(concrete)) or np.any(concrete <= 0):
            raise ValueError(f"safejax.rl.lagrange_init: lambda_init must be > 0 (log-parameterised), "
                             f"got {concrete.tolist()}")
    lam = jnp.broadcast_to(jnp.asarray(lambda_init, dtype).reshape(-1), (k,))
    log_lambda = jnp.log(lam)
    return LagrangeState(
        log_lambda=log_lambda,
        opt_state=optax.sgd(lambda_lr).init(log_lambda),
        cost_window=jnp.zeros((k, w), dtype),
        window_count=jnp.zeros((), jnp.int32),
        window_pos=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def lagrange_record(state, episode_costs, valid=None):
    """Append a batch of episode costs to the ring buffer (oldest entries are overwritten first).

    The window mechanism of both multiplier rules: ``state`` is a :class:`LagrangeState` or a
    :class:`safejax.rl.PIDLagrangeState` (any state with ``cost_window``, ``window_count`` and ``window_pos``).

    Equivalent to appending the costs one by one to ``collections.deque(maxlen=W)``; when more than W arrive at
    once only the last W are kept.

    Args:
      state: LagrangeState.
      episode_costs: ``[B]`` (K = 1) or ``[K, B]`` raw cost-model end scores (no KL).
      valid: optional ``[B]`` bool; rows with False (e.g. batch padding) are skipped.
    Returns:
      the new LagrangeState.
    """
    k, w = state.cost_window.shape
    c = jnp.asarray(episode_costs)
    if c.ndim == 1:
        if k != 1:
            raise ValueError(f"safejax.rl.lagrange_record: episode_costs must be [K, B] = [{k}, B] for {k} "
                             f"constraints, got shape {list(c.shape)}")
        c = c[None]
    if c.ndim != 2 or c.shape[0] != k:
        raise ValueError(f"safejax.rl.lagrange_record: episode_costs must be [B] or [{k}, B], got shape "
                         f"{list(jnp.shape(episode_costs))}")
    b = c.shape[1]
    v = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
    if v.shape != (b,):
        raise ValueError(f"safejax.rl.lagrange_record: valid must have shape [{b}], got {list(v.shape)}")
    c = c.astype(state.cost_window.dtype)
    rank = jnp.cumsum(v.astype(jnp.int32))          # 1-based rank among valid entries
    total = rank[-1] if b else jnp.zeros((), jnp.int32)
    keep = v & (total - rank < w)                   # only the last W valid entries survive
    idx = jnp.where(keep, (state.window_pos + rank - 1) % w, w)  # index w is out of bounds -> dropped
    window = state.cost_window.at[:, idx].set(c, mode="drop")
    return state._replace(
        cost_window=window,
        window_count=jnp.minimum(state.window_count + total, w).astype(jnp.int32),
        window_pos=((state.window_pos + total) % w).astype(jnp.int32),
    )


def episode_cost_mean(state):
    """Mean of the valid window entries per constraint: ``[K]`` (0 where the window is still empty)."""
    k, w = state.cost_window.shape
    valid = jnp.arange(w) < state.window_count
    total = jnp.sum(jnp.where(valid[None, :], state.cost_window, 0), axis=-1)
    return total / jnp.maximum(state.window_count, 1).astype(state.cost_window.dtype)


def multiplier(state):
    """The current multipliers ``[K]`` of either rule: ``exp(log_lambda)`` for a :class:`LagrangeState` (SGD on
    log lambda), the stored ``lam`` for a :class:`safejax.rl.PIDLagrangeState`."""
    if isinstance(state, LagrangeState):
        return jnp.exp(state.log_lambda)
    return state.lam


def lagrange_step(state, *, threshold, lambda_lr, lambda_max=None, update_delay_steps=0):
    """One multiplier update from the current window (reference: start of every ``rl_step``).

    If ``state.step >= update_delay_steps`` and the window is not empty:
    ``Jbar = episode_cost_mean(state)``, ``loss = -sum_k (Jbar_k - threshold_k) * exp(log_lambda_k)``, one
    ``optax.sgd(lambda_lr)`` step on ``log_lambda``, then ``log_lambda = min(log_lambda, log(lambda_max))`` when
    ``lambda_max`` is given. ``step`` always increases by 1. lambda rises while the mean cost is above the threshold
    (constraint ``E[C] <= threshold``) and falls once it is below; there is no lower clamp.

    Args:
      state: LagrangeState.
      threshold: scalar or ``[K]`` cost threshold (= -d in the paper).
      lambda_lr: SGD learning rate (reference 0.1); number or array.
      lambda_max: None (no cap; a static Python choice) or a number / ``[K]`` cap on lambda.
      update_delay_steps: number of initial calls that leave lambda unchanged.
    Returns:
      the new LagrangeState.
    """
    k, _ = state.cost_window.shape
    dtype = state.log_lambda.dtype
    thr = jnp.asarray(threshold, dtype)
    if thr.ndim > 1 or thr.size not in (1, k):
        raise ValueError(f"safejax.rl.lagrange_step: threshold must be a scalar or [{k}], got {list(thr.shape)}")
    thr = jnp.broadcast_to(thr.reshape(-1), (k,))
    jbar = jax.lax.stop_gradient(episode_cost_mean(state))

    def loss_fn(log_lambda):
        return -jnp.sum((jbar - thr) * jnp.exp(log_lambda))

    grads = jax.grad(loss_fn)(state.log_lambda)
    tx = optax.sgd(lambda_lr)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.log_lambda)
    new_log_lambda = optax.apply_updates(state.log_lambda, updates)
    if lambda_max is not None:
        new_log_lambda = jnp.minimum(new_log_lambda, jnp.log(jnp.asarray(lambda_max, dtype)))
    do_update = (state.step >= update_delay_steps) & (state.window_count > 0)
    log_lambda = jnp.where(do_update, new_log_lambda, state.log_lambda).astype(dtype)
    opt_state = jax.tree.map(lambda new, old: jnp.where(do_update, new, old), new_opt_state, state.opt_state)
    return state._replace(log_lambda=log_lambda, opt_state=opt_state, step=(state.step + 1).astype(jnp.int32))


def lagrange_update(state, episode_cost, *, threshold, lambda_lr, lambda_max=None, update_delay_steps=0,
                    valid=None):
    """:func:`lagrange_record` the batch's episode costs, then one :func:`lagrange_step` (the reference order: the
    window already holds the current batch when lambda is updated).

    Args:
      state: LagrangeState.
      episode_cost: ``[B]`` or ``[K, B]`` raw cost-model end scores.
      threshold, lambda_lr, lambda_max, update_delay_steps: as :func:`lagrange_step`.
      valid: optional ``[B]`` bool row mask, as :func:`lagrange_record`.
    Returns:
      the new LagrangeState.
    """
    state = lagrange_record(state, episode_cost, valid=valid)
    return lagrange_step(state, threshold=threshold, lambda_lr=lambda_lr, lambda_max=lambda_max,
                         update_delay_steps=update_delay_steps)

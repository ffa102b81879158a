"""The constraint side of the PPO-Lagrangian stage: the ``lagrange`` config section and the multiplier state.

K constraints come from **one cost model with K outputs** (``score_dim = K``): one backbone forward scores every
harm category, the cost critic starts from the cost model and so has K value heads too, and a K = 1 cost model is
exactly Safe RLHF.  K is read from the loaded cost model; every per-constraint setting below is a number (the
same for every constraint) or a list of K numbers.

Two multiplier rules share the call site (every RL micro-step, after the batch's episode costs entered the
window) and the episode-cost window:

* ``sgd_log`` (default, Safe RLHF): one SGD step on log lambda, ``log l += lambda_lr * l * (J - threshold)``;
* ``pid``: the PID Lagrangian of Stooke et al. 2020 (:mod:`safejax.rl.pid`), gains under ``lagrange.pid``.

When to use which: ``sgd_log`` reproduces Safe RLHF and is the right choice to compare with it.  Because the
log-space step is proportional to lambda itself, it keeps climbing while the window is above the threshold and
falls slowly afterwards, so lambda overshoots and the policy ends far safer than asked (paying helpfulness).
``pid`` reacts to the violation directly (P), accumulates it (I) and brakes on a rising cost (D); use it when the
threshold is a tolerance you want to sit at rather than well below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from safejax import rl
from safejax.config import ConfigError, check_range

RULES = ("sgd_log", "pid")
PER_CONSTRAINT_KEYS = ("threshold", "lambda_init", "lambda_lr", "lambda_max")


@dataclasses.dataclass
class PIDSection:
    """Gains of the PID multiplier rule (``lagrange.rule: pid``).

    The defaults are ``rl.SUGGESTED_PID_GAINS``: omnisafe's (0.1, 0.01, 0.01) assume episode costs near 25 and one
    update per epoch; here a cost is a cost-model end score of order 1 around a threshold near 0 and lambda is
    updated every micro-step (hundreds of updates per run), so a violation of 1 should move lambda by a few
    hundredths per update through I (ki = 0.05), by about half a unit at once through P once the EMA has caught up
    (kp = 0.5), and a rising cost should push back before it crosses (kd = 0.5).  A larger ki makes lambda follow
    the cost faster and oscillate more; halve it when there are twice as many updates per run.

    Attributes:
      kp: proportional gain on the EMA of the violation ``J - threshold``.
      ki: integral gain; the I term starts at ``lagrange.lambda_init`` and never goes below 0.
      kd: derivative gain on the rise of the EMA of ``J`` over ``d_delay`` updates (only rises count).
      delta_p_ema: EMA factor of the violation fed to P (closer to 1 = smoother, slower).
      delta_d_ema: EMA factor of ``J`` fed to D.
      d_delay: number of updates the derivative looks back.
    """

    kp: float = rl.SUGGESTED_PID_GAINS["kp"]
    ki: float = rl.SUGGESTED_PID_GAINS["ki"]
    kd: float = rl.SUGGESTED_PID_GAINS["kd"]
    delta_p_ema: float = 0.95
    delta_d_ema: float = 0.95
    d_delay: int = 10

    def validate(self) -> None:
        for key in ("kp", "ki", "kd"):
            check_range(f"lagrange.pid.{key}", getattr(self, key), low=0.0)
        for key in ("delta_p_ema", "delta_d_ema"):
            check_range(f"lagrange.pid.{key}", getattr(self, key), low=0.0, high=1.0)
        check_range("lagrange.pid.d_delay", self.d_delay, low=1)


@dataclasses.dataclass
class LagrangeSection:
    """The constraints of PPO-Lagrangian (and nu of reward shaping).

    Attributes:
      lambda_init: initial multiplier per constraint (> 0 for sgd_log, >= 0 for pid, where it is the start of the
        I term); also nu, the fixed multiplier of reward shaping.  A number or a list of K.
      lambda_lr: learning rate of the SGD step on log lambda (sgd_log only); a number or a list of K.
      lambda_max: cap on every multiplier (None: no cap); a number or a list of K.
      threshold: cost threshold per constraint, in the cost model's units (constraint ``E[C_k] <= threshold_k``);
        a number or a list of K.
      names: one name per constraint for the metrics (``train/lambda/<name>``, ``train/episode_cost/<name>``,
        ``eval/cost/<name>``); empty = ``["cost"]`` for K = 1, ``["c0", "c1", ...]`` otherwise.
      rule: ``sgd_log`` (Safe RLHF) or ``pid`` (see the module docstring for when to use which).
      pid: gains of the pid rule.
      episode_cost_window_size: episode costs per constraint the multiplier averages (J = window mean).
      episode_cost_window_ranks: the reference keeps a window per rank and averages over ranks, so lambda sees
        window_size x ranks costs (128 x 8 = 1,024 in the paper's run); safejax keeps one global window of that
        many (equal to the mean of per-rank means while every rank adds the same number of costs per batch).
      lambda_update_delay_steps: micro-steps (lambda steps, the reference's global_step) before lambda moves.
    """

    lambda_init: float | list[float] = 1.0
    lambda_lr: float | list[float] = 0.1
    lambda_max: float | list[float] | None = 5.0
    threshold: float | list[float] = 0.0
    names: list[str] = dataclasses.field(default_factory=list)
    rule: str = "sgd_log"
    pid: PIDSection = dataclasses.field(default_factory=PIDSection)
    episode_cost_window_size: int = 128
    episode_cost_window_ranks: int = 1
    lambda_update_delay_steps: int = 0

    @property
    def window(self) -> int:
        """Length of the global episode-cost window: ``episode_cost_window_size * episode_cost_window_ranks``."""
        return self.episode_cost_window_size * self.episode_cost_window_ranks

    def validate(self) -> None:
        check_range("lagrange.rule", self.rule, choices=RULES)
        positive = self.rule == "sgd_log"  # log lambda needs lambda > 0; the PID I term may start at 0
        for v in _values(self.lambda_init):
            check_range("lagrange.lambda_init", v, low=0.0, low_open=positive)
        for v in _values(self.lambda_lr):
            check_range("lagrange.lambda_lr", v, low=0.0)
        for v in _values(self.lambda_max):
            check_range("lagrange.lambda_max", v, low=0.0, low_open=True)
        for v in _values(self.threshold):
            check_range("lagrange.threshold", v, low=-float("inf"))
        for key in PER_CONSTRAINT_KEYS:
            if isinstance(getattr(self, key), list) and not getattr(self, key):
                raise ConfigError(f"config key 'lagrange.{key}' is an empty list: give a number or one per constraint")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"config key 'lagrange.names' = {self.names} has duplicate names")
        check_range("lagrange.episode_cost_window_size", self.episode_cost_window_size, low=1)
        check_range("lagrange.episode_cost_window_ranks", self.episode_cost_window_ranks, low=1)

    def check_constraints(self, k: int, source: str = "the cost model") -> None:
        """ConfigError naming the key unless every list setting has ``k`` entries (``k`` from ``source``)."""
        for key in PER_CONSTRAINT_KEYS:
            v = getattr(self, key)
            if isinstance(v, (list, tuple)) and len(v) != k:
                raise ConfigError(f"config key 'lagrange.{key}' has {len(v)} entries but {source} has K = {k} "
                                  f"cost outputs: give a number or {k} values")
        if self.names and len(self.names) != k:
            raise ConfigError(f"config key 'lagrange.names' has {len(self.names)} names but {source} has K = {k} "
                              "cost outputs")

    def constraint_names(self, k: int) -> list[str]:
        """The ``k`` metric names: ``names``, else ``["cost"]`` (K = 1) or ``["c0", "c1", ...]``."""
        if self.names:
            return list(self.names)
        return ["cost"] if k == 1 else [f"c{i}" for i in range(k)]

    def per_constraint(self, key: str):
        """A setting as the multiplier functions take it: the number itself, or a float32 ``[K]`` array."""
        v = getattr(self, key)
        return jnp.asarray(v, jnp.float32) if isinstance(v, (list, tuple)) else v


def _values(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def lagrange_state_init(lc: LagrangeSection, k: int):
    """The multiplier state of ``k`` constraints for ``lc.rule``: a :class:`safejax.rl.LagrangeState` or a
    :class:`safejax.rl.PIDLagrangeState`, windows ``[k, lc.window]`` (checkpointed with the train state)."""
    lc.check_constraints(k)
    if lc.rule == "pid":
        return rl.pid_lagrange_init(num_constraints=k, window_size=lc.window, d_delay=lc.pid.d_delay,
                                    lambda_init=lc.lambda_init)
    return rl.lagrange_init(lc.lambda_init, num_constraints=k, window_size=lc.window, lambda_lr=lc.lambda_lr)


def lagrange_micro_step(lc: LagrangeSection, state):
    """One multiplier update from the current window (every RL micro-step), for either rule; the PID rule, like
    SGD on log lambda, holds still for the first ``lambda_update_delay_steps`` calls."""
    if lc.rule != "pid":
        return rl.lagrange_step(state, threshold=lc.per_constraint("threshold"),
                                lambda_lr=lc.per_constraint("lambda_lr"), lambda_max=lc.per_constraint("lambda_max"),
                                update_delay_steps=lc.lambda_update_delay_steps)
    g = lc.pid
    new = rl.pid_lagrange_step(state, threshold=lc.per_constraint("threshold"), kp=g.kp, ki=g.ki, kd=g.kd,
                               delta_p_ema=g.delta_p_ema, delta_d_ema=g.delta_d_ema,
                               lambda_max=lc.per_constraint("lambda_max"))
    if not lc.lambda_update_delay_steps:
        return new
    held = state._replace(step=new.step)
    go = state.step >= lc.lambda_update_delay_steps
    return jax.tree.map(lambda a, b: jnp.where(go, a, b), new, held)


def constraint_metrics(prefix: str, values, names: Sequence[str]) -> dict:
    """``{prefix/<name>: values[k]}`` for a ``[K]`` array."""
    return {f"{prefix}/{n}": values[i] for i, n in enumerate(names)}


def cost_metrics(lc: LagrangeSection, cost, lag, *, with_lambda: bool) -> dict:
    """Cost and multiplier metrics of one iteration (keys without the ``train/`` prefix).

    Per constraint: ``cost/<name>`` (batch mean of the end costs), ``episode_cost/<name>`` (the window mean J_k
    that drives lambda_k) and, ``with_lambda``, ``lambda/<name>``.  Plus the aggregate keys of the K = 1 stage:
    ``cost``, ``episode_cost`` (for K > 1 the mean over the constraints) and ``lambda`` (for K > 1 the sum over the
    constraints: the total weight of the costs in ``(A_r - sum_k l_k A_c,k) / (1 + sum_k l_k)``).

    Args:
      cost: ``[B]`` or ``[B, K]`` cost-model end scores.  lag: the multiplier state (either rule).
    """
    ep_k = rl.episode_cost_mean(lag)  # [K]
    names = lc.constraint_names(ep_k.shape[0])
    cost_k = jnp.mean(cost.reshape(cost.shape[0], -1), axis=0)
    out = {"cost": jnp.mean(cost), "episode_cost": ep_k[0] if len(names) == 1 else jnp.mean(ep_k)}
    out.update(constraint_metrics("cost", cost_k, names))
    out.update(constraint_metrics("episode_cost", ep_k, names))
    if with_lambda:
        lam_k = rl.multiplier(lag)
        out["lambda"] = lam_k[0] if len(names) == 1 else jnp.sum(lam_k)
        out.update(constraint_metrics("lambda", lam_k, names))
    return out

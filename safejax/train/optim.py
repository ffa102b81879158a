"""Optimizers: AdamW with the reference's weight-decay groups, warmup + cosine/constant/linear schedules,
global-norm clipping, and a small log of every optimizer step (lr applied, gradient norm before clipping).

Gradient accumulation: the supervised stages average micro-batches inside their jitted step (a ``lax.scan``),
so the optimizer sees one averaged gradient per update.  The RL stage, where every micro-step also moves lambda
and the critics, uses :func:`make_accumulating_optimizer` (``optax.MultiSteps``): like the reference's engine
it averages ``grad_accum`` micro-steps and updates at the boundary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from safejax.config import ConfigError, check_range

SCHEDULES = ("cosine", "constant", "linear", "constant_with_warmup")
DECAY_RULES = ("reference", "matrices")


@dataclasses.dataclass
class OptimConfig:
    """AdamW + schedule of one model.

    Attributes:
      lr: peak learning rate.
      schedule: ``cosine`` | ``linear`` | ``constant`` (ignores warm-up, as HF's) | ``constant_with_warmup``;
        the warm-up is linear from 0 over ``int(warmup_ratio * updates)`` optimizer updates, and the lr of
        update ``k`` (from 0) is ``lr * f(k)`` as in ``transformers.get_scheduler``.
      warmup_ratio: fraction of the optimizer updates spent warming up.
      weight_decay: decoupled (AdamW) weight decay.
      decay_rule: which parameters decay.  ``reference`` (safe-rlhf / HF Trainer): every parameter except those
        whose lower-cased HF name contains ``bias`` or ``layernorm.weight`` (so LLaMA's final ``model.norm.weight``
        and GPT-2's ``ln_*`` weights decay); ``matrices``: only parameters with ndim >= 2.
      b1, b2, eps: Adam moments and epsilon (``m / (sqrt(v) + eps)``).
      clip_norm: global-norm clipping (<= 0 disables).
      grad_accum: micro-batches averaged into one optimizer update.
    """

    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    decay_rule: str = "reference"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1

    def validate(self) -> None:
        check_range("optim.lr", self.lr, low=0.0, low_open=True)
        check_range("optim.schedule", self.schedule, choices=SCHEDULES)
        check_range("optim.decay_rule", self.decay_rule, choices=DECAY_RULES)
        check_range("optim.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_range("optim.weight_decay", self.weight_decay, low=0.0)
        check_range("optim.b1", self.b1, low=0.0, high=1.0)
        check_range("optim.b2", self.b2, low=0.0, high=1.0)
        check_range("optim.eps", self.eps, low=0.0)
        if math.isnan(self.clip_norm):
            raise ConfigError(f"config key 'optim.clip_norm' = {self.clip_norm!r} must be a number (<= 0 disables)")
        check_range("optim.grad_accum", self.grad_accum, low=1)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """HF-style schedules over ``total_steps`` optimizer updates: linear warm-up over
    ``int(total_steps * warmup_ratio)`` updates; 'constant' ignores the warm-up."""
    total_steps = max(int(total_steps), 1)
    warmup = int(total_steps * cfg.warmup_ratio)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "constant_with_warmup":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _path_name(path) -> str:
    """Our param path as a Llama-style HF name (``kernel`` / ``embedding`` -> ``weight``)."""
    parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def reference_decays(hf_name: str) -> bool:
    """The reference's rule: decay unless the lower-cased name contains ``bias`` or ``layernorm.weight``."""
    name = hf_name.lower()
    return not ("bias" in name or "layernorm.weight" in name)


def decay_mask(params, names=None, rule: str = "reference"):
    """Bool tree shaped like ``params``: True where weight decay applies.

    Args:
      params: the params tree.
      names: optional tree of HF names shaped like ``params`` (:meth:`ModelDef.hf_names`); without it the names
        are the Llama-style names of the param paths (right for the Llama family, not for GPT-2's ``ln_*``).
      rule: ``reference`` (:func:`reference_decays`) or ``matrices`` (ndim >= 2).
    """
    if rule == "matrices":
        return jax.tree.map(lambda x: x.ndim >= 2, params)
    if names is not None:
        return jax.tree.map(lambda _, n: reference_decays(n), params, names)
    return jax.tree_util.tree_map_with_path(lambda p, _: reference_decays(_path_name(p)), params)


class StepLog(NamedTuple):
    """Optimizer-step log kept in the optimizer state (first element of the chain).

    Attributes:
      count: ``[]`` int32, optimizer updates applied so far.
      lr: ``[]`` float32, learning rate of the last update (0 before the first).
      grad_norm: ``[]`` float32, global gradient norm of the last update, before clipping.
    """

    count: jax.Array
    lr: jax.Array
    grad_norm: jax.Array


def log_steps(schedule: optax.Schedule) -> optax.GradientTransformation:
    """Identity transform that records :class:`StepLog` (place it before clipping)."""

    def init(params):
        del params
        return StepLog(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        return updates, StepLog(state.count + 1, lr, optax.tree_utils.tree_norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def step_log(opt_state) -> StepLog:
    """The :class:`StepLog` of an optimizer state built by :func:`make_optimizer` (accumulating or not)."""
    if isinstance(opt_state, optax.MultiStepsState):
        opt_state = opt_state.inner_opt_state
    return opt_state[0]


def make_optimizer(cfg: OptimConfig, total_steps: int, param_names: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``log_steps -> clip -> adamw`` with the schedule over ``total_steps`` optimizer updates.

    ``param_names``: tree of HF names for the ``reference`` decay rule (see :func:`decay_mask`)."""
    schedule = make_schedule(cfg, total_steps)
    parts = [log_steps(schedule)]
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=lambda p: decay_mask(p, param_names, cfg.decay_rule)))
    return optax.chain(*parts), schedule


def make_accumulating_optimizer(cfg: OptimConfig, micro_steps: int, param_names: Any = None
                                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Optimizer fed once per micro-step: averages ``cfg.grad_accum`` micro-steps per update (``optax.MultiSteps``
    when > 1) and schedules over ``micro_steps // grad_accum`` updates, as the reference's engine does."""
    tx, schedule = make_optimizer(cfg, max(int(micro_steps) // cfg.grad_accum, 1), param_names)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return tx, schedule

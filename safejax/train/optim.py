"""Optimizers: AdamW with weight decay off for biases and norm scales, warmup + cosine/constant/linear
schedules, global-norm clipping.  Gradient accumulation happens inside the jitted steps (a
``lax.scan`` over micro-batches), so the optimizer sees one averaged gradient per update."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from safejax.config import ConfigError, check_range


@dataclasses.dataclass
class OptimConfig:
    lr: float = 2e-5
    schedule: str = "cosine"          # cosine | constant | linear
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0            # global-norm clipping (<= 0 disables)
    grad_accum: int = 1               # micro-batches summed into one update

    def validate(self) -> None:
        check_range("optim.lr", self.lr, low=0.0, low_open=True)
        check_range("optim.schedule", self.schedule, choices=("cosine", "constant", "linear"))
        check_range("optim.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_range("optim.weight_decay", self.weight_decay, low=0.0)
        check_range("optim.b1", self.b1, low=0.0, high=1.0)
        check_range("optim.b2", self.b2, low=0.0, high=1.0)
        check_range("optim.eps", self.eps, low=0.0)
        if math.isnan(self.clip_norm):
            raise ConfigError(f"config key 'optim.clip_norm' = {self.clip_norm!r} must be a number (<= 0 disables)")
        check_range("optim.grad_accum", self.grad_accum, low=1)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """HF-style schedules: linear warmup over ``warmup_ratio * total_steps``; 'constant' ignores warmup."""
    total_steps = max(int(total_steps), 1)
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
    """True for matrices (kernels, embeddings); False for biases and norm scales (ndim < 2)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule

"""Static shapes of the RL stage: prompt-width buckets under the reference's response budget, and the number of
RL micro-steps a run makes (the span of every optimizer schedule)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from safejax.train.ppo import PPOConfig


def prompt_buckets(cfg: PPOConfig) -> list[tuple[int, int]]:
    """``(prompt width P_b, decode steps N_b)`` of each bucket, narrowest first.  Without ``data.max_length``:
    one bucket ``(prompt_width, rollout.max_new_tokens)``.  With it, a batch in bucket b has its longest prompt in
    ``(P_{b-1}, P_b]``, so ``N_b = max_length - P_{b-1} - 1`` decode steps hold any budget
    ``max_length - longest`` of the bucket (the rollout cuts each batch at its own budget)."""
    d = cfg.data
    if not d.max_length:
        return [(d.prompt_width, cfg.rollout.max_new_tokens)]
    widths = sorted(set(d.prompt_buckets) | {d.prompt_width})
    return [(w, d.max_length - lo - 1) for w, lo in zip(widths, [0] + widths[:-1])]


def bucket_width(prompt_mask, buckets: list[tuple[int, int]]) -> int:
    """Narrowest bucket width holding the longest prompt of a host batch ``prompt_mask [b, P]`` (all hosts)."""
    longest = int(np.max(np.sum(np.asarray(prompt_mask), axis=-1), initial=0))
    if jax.process_count() > 1:
        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    return next(w for w, _ in buckets if w >= longest)


def rl_micro_steps(cfg: PPOConfig, iterations: int) -> int:
    """RL micro-steps of a run (the reference's ``total_training_steps``): iterations x update_iters x
    mini-batches per prompt batch.  Each model's schedule spans this // its ``grad_accum`` optimizer updates."""
    return iterations * cfg.ppo.update_iters * (cfg.train.batch_size // cfg.ppo.micro_batch_size)

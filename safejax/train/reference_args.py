"""safe-rlhf's PPO-Lag command-line options -> a :class:`PPOConfig` (migrating a reference run, golden tests).

The reference (PKU-Alignment/safe-rlhf, ``safe_rlhf/algorithms/ppo_lag``) is driven by argparse options such as
``--actor_lr`` or ``--per_device_train_batch_size``; :func:`ppo_config_from_reference_args` maps a dict of them
(as ``scripts/ppo-lag.sh`` passes them, or as a golden ``summary.json`` records them) onto safejax's sections.
Options the reference hard-codes (gamma 1, GAE lambda 0.95, AdamW betas (0.9, 0.95), eps 1e-8, clipping 1.0)
are safejax's defaults.  Geometry: safejax's batches are global, so ``train.batch_size`` is
``per_device_prompt_batch_size * num_return_sequences * world_size`` and ``ppo.micro_batch_size`` is
``per_device_train_batch_size * world_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from safejax.config import ConfigError
from safejax.train.optim import OptimConfig
from safejax.train.ppo import PPOConfig

# options that do not change the numbers of an update (memory tricks, data names, logging)
_IGNORED = {"actor_gradient_checkpointing", "critic_gradient_checkpointing", "ptx_datasets", "train_datasets",
            "eval_datasets", "seed", "output_dir", "log_type", "log_project", "save_interval", "bf16", "fp16", "tf32",
            "zero_stage", "offload", "need_eval", "eval_strategy", "eval_interval", "log_dir", "log_run_name",
            "trust_remote_code", "deepspeed", "local_rank", "actor_model_name_or_path", "reward_model_name_or_path",
            "cost_model_name_or_path", "reward_critic_model_name_or_path", "cost_critic_model_name_or_path",
            "normalize_reward", "normalize_cost", "max_length"}


def _optim(hp: Mapping[str, Any], who: str, default: OptimConfig) -> OptimConfig:
    return dataclasses.replace(
        default,
        lr=float(hp.get(f"{who}_lr", default.lr)),
        weight_decay=float(hp.get(f"{who}_weight_decay", default.weight_decay)),
        schedule=str(hp.get(f"{who}_lr_scheduler_type", default.schedule)),
        warmup_ratio=float(hp.get(f"{who}_lr_warmup_ratio", default.warmup_ratio)),
        grad_accum=int(hp.get("gradient_accumulation_steps", default.grad_accum)),
        decay_rule="reference",
    )


def ppo_config_from_reference_args(hp: Mapping[str, Any], *, use_ptx: bool, world_size: int = 1,
                                   base: PPOConfig | None = None) -> PPOConfig:
    """Map the reference's PPO-Lag options onto a copy of ``base`` (default :class:`PPOConfig`).

    Args:
      hp: option name -> value (``kl_coeff``, ``clip_range_*``, ``ptx_coeff``, ``threshold``, ``lambda_*``,
        ``episode_cost_window_size``, ``actor_*`` / ``critic_*`` optimizer options, ``per_device_*_batch_size``,
        ``update_iters``, ``epochs``, ``num_return_sequences``, ``gradient_accumulation_steps``, and optionally
        ``temperature``, ``top_p``, ``repetition_penalty``).
      use_ptx: whether the reference ran with ptx datasets (``ptx_coeff`` only matters then).
      world_size: number of data-parallel ranks of the reference run; the episode-cost window spans
        ``episode_cost_window_size * world_size`` costs, as the reference's per-rank windows averaged over ranks.
    Raises:
      ConfigError: an option safejax does not know (so nothing is silently dropped).
    """
    cfg = dataclasses.replace(base or PPOConfig())
    known = {"kl_coeff", "clip_range_ratio", "clip_range_score", "clip_range_value", "ptx_coeff", "threshold",
             "lambda_init", "lambda_lr", "lambda_max", "lambda_update_delay_steps", "episode_cost_window_size",
             "epochs", "num_return_sequences", "gradient_accumulation_steps", "per_device_prompt_batch_size",
             "per_device_train_batch_size", "update_iters", "temperature", "top_p", "repetition_penalty"}
    known |= {f"{w}_{k}" for w in ("actor", "critic")
              for k in ("lr", "weight_decay", "lr_scheduler_type", "lr_warmup_ratio")}
    unknown = sorted(set(hp) - known - _IGNORED)
    if unknown:
        raise ConfigError(f"reference options not mapped to safejax: {', '.join(unknown)}")
    ppo = dataclasses.replace(
        cfg.ppo,
        kl_coeff=float(hp.get("kl_coeff", cfg.ppo.kl_coeff)),
        clip_range_ratio=float(hp.get("clip_range_ratio", cfg.ppo.clip_range_ratio)),
        clip_range_score=float(hp.get("clip_range_score", cfg.ppo.clip_range_score)),
        clip_range_value=float(hp.get("clip_range_value", cfg.ppo.clip_range_value)),
        ptx_coeff=float(hp.get("ptx_coeff", cfg.ppo.ptx_coeff)) if use_ptx else 0.0,
        update_iters=int(hp.get("update_iters", cfg.ppo.update_iters)),
        micro_batch_size=int(hp.get("per_device_train_batch_size", cfg.ppo.micro_batch_size)) * world_size,
    )
    lam_max = hp.get("lambda_max", cfg.lagrange.lambda_max)
    lagrange = dataclasses.replace(
        cfg.lagrange,
        threshold=float(hp.get("threshold", cfg.lagrange.threshold)),
        lambda_init=float(hp.get("lambda_init", cfg.lagrange.lambda_init)),
        lambda_lr=float(hp.get("lambda_lr", cfg.lagrange.lambda_lr)),
        lambda_max=None if lam_max is None else float(lam_max),
        lambda_update_delay_steps=int(hp.get("lambda_update_delay_steps", cfg.lagrange.lambda_update_delay_steps)),
        episode_cost_window_size=int(hp.get("episode_cost_window_size", cfg.lagrange.episode_cost_window_size)),
        episode_cost_window_ranks=world_size,
    )
    per_rank = int(hp.get("per_device_prompt_batch_size", cfg.train.batch_size // world_size))
    train = dataclasses.replace(cfg.train, epochs=int(hp.get("epochs", cfg.train.epochs)),
                                batch_size=per_rank * int(hp.get("num_return_sequences", 1)) * world_size)
    rollout = dataclasses.replace(
        cfg.rollout, top_k=50,
        temperature=float(hp.get("temperature", cfg.rollout.temperature)),
        top_p=float(hp.get("top_p", cfg.rollout.top_p)),
        repetition_penalty=float(hp.get("repetition_penalty", cfg.rollout.repetition_penalty)))
    return dataclasses.replace(cfg, algorithm="ppo-lag", ppo=ppo, lagrange=lagrange, train=train, rollout=rollout,
                               actor_optim=_optim(hp, "actor", cfg.actor_optim),
                               critic_optim=_optim(hp, "critic", cfg.critic_optim))

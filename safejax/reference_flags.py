"""The reference implementation's command-line flags (safe-rlhf's ``scripts/*.sh``), accepted as aliases.

``safejax ppo-lag --config C --actor_model_name_or_path runs/sft --lambda_init 1`` runs as
``safejax ppo-lag --config C actor.path=runs/sft lagrange.lambda_init=1``.  Only flags whose meaning is
the same in safejax are translated; flags that mean something else here (``--max_length`` of the RL
stage, per-device batch sizes) stop with a one-line error naming the safejax keys; flags about the
reference's DeepSpeed / logging set-up are ignored with a warning.  The mapping is the table
"Coming from safe-rlhf" in the README.
"""

from __future__ import annotations

import logging
from typing import Sequence

from safejax.config import ConfigError

log = logging.getLogger("safejax")

SUPERVISED = ("sft", "rm", "cm")
RL = ("ppo-lag", "ppo", "ppo-reward-shaping")

_COMMON = {"output_dir": "out_dir", "seed": "seed"}
_SUPERVISED = {
    "model_name_or_path": "model.path", "train_datasets": "data.train", "eval_datasets": "data.eval",
    "max_length": "data.max_length", "epochs": "train.epochs", "lr": "optim.lr",
    "lr_scheduler_type": "optim.schedule", "lr_warmup_ratio": "optim.warmup_ratio",
    "weight_decay": "optim.weight_decay", "loss_type": "loss_type", "regularization": "regularization",
}
_RL = {
    "actor_model_name_or_path": "actor.path", "reward_model_name_or_path": "reward_model",
    "cost_model_name_or_path": "cost_model", "reward_critic_model_name_or_path": "reward_critic",
    "cost_critic_model_name_or_path": "cost_critic", "train_datasets": "data.prompts",
    "ptx_datasets": "data.ptx", "eval_datasets": "data.eval_prompts", "epochs": "train.epochs",
    "update_iters": "ppo.update_iters", "kl_coeff": "ppo.kl_coeff", "clip_range_ratio": "ppo.clip_range_ratio",
    "clip_range_score": "ppo.clip_range_score", "clip_range_value": "ppo.clip_range_value",
    "ptx_coeff": "ppo.ptx_coeff", "threshold": "lagrange.threshold", "lambda_init": "lagrange.lambda_init",
    "lambda_lr": "lagrange.lambda_lr", "lambda_max": "lagrange.lambda_max",
    "lambda_update_delay_steps": "lagrange.lambda_update_delay_steps",
    "episode_cost_window_size": "lagrange.episode_cost_window_size", "temperature": "rollout.temperature",
    "top_p": "rollout.top_p", "repetition_penalty": "rollout.repetition_penalty",
    "actor_lr": "actor_optim.lr", "actor_weight_decay": "actor_optim.weight_decay",
    "actor_lr_scheduler_type": "actor_optim.schedule", "actor_lr_warmup_ratio": "actor_optim.warmup_ratio",
    "critic_lr": "critic_optim.lr", "critic_weight_decay": "critic_optim.weight_decay",
    "critic_lr_scheduler_type": "critic_optim.schedule", "critic_lr_warmup_ratio": "critic_optim.warmup_ratio",
}
_LISTS = {"train_datasets", "eval_datasets", "ptx_datasets"}  # take one or more values
_SWITCHES = {"gradient_checkpointing", "actor_gradient_checkpointing", "critic_gradient_checkpointing"}
_DIFFERENT = {
    "per_device_train_batch_size": "train.batch_size is the GLOBAL batch (per-device size x devices x "
                                   "accumulation); in RL ppo.micro_batch_size is the global PPO micro-batch",
    "per_device_prompt_batch_size": "train.batch_size is the GLOBAL number of prompts per iteration",
    "per_device_eval_batch_size": "eval_batch_size is global",
    "gradient_accumulation_steps": "optim.grad_accum splits the global train.batch_size into micro-batches",
    "num_return_sequences": "safejax samples one answer per prompt",
}
_RL_DIFFERENT = {"max_length": "data.prompt_width (prompt tokens, left-padded) + rollout.max_new_tokens "
                               "(the reference's max_length counts both)"}
_IGNORED = {"zero_stage", "offload", "tf32", "bf16", "fp16", "deepspeed", "local_rank", "log_type", "log_dir",
            "log_project", "log_run_name", "save_16bit", "trust_remote_code", "need_eval", "eval_strategy",
            "eval_interval", "normalize_score_during_training", "normalizer_type", "normalizer_momentum",
            "normalize_reward", "normalize_cost"}


def _table(command: str) -> dict[str, str]:
    if command in SUPERVISED:
        return {**_COMMON, **_SUPERVISED}
    if command in RL:
        return {**_COMMON, **_RL}
    return {}


def translate(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(argv, notes)``: ``argv`` with the reference's ``--flag value`` pairs of a stage command rewritten as
    ``key=value``, and one note per translated or ignored flag (for the log)."""
    argv = list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    table = _table(command or "")
    if not table:
        return argv, []
    different = {**_DIFFERENT, **(_RL_DIFFERENT if command in RL else {})}
    known = set(table) | _SWITCHES | set(different) | _IGNORED
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        name, eq, inline = tok[2:].partition("=")
        if not tok.startswith("--") or name not in known:
            out.append(tok)
            continue
        values = [inline] if eq else []
        if not eq and name not in _SWITCHES:
            while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                values.append(argv[i])
                i += 1
                if name not in _LISTS:
                    break
        flag = f"reference flag --{name}"
        if name in different:
            raise ConfigError(f"safejax {command}: {flag} has no direct equivalent: {different[name]} (see 'Coming from safe-rlhf' "
                              "in the README)")
        if name in _IGNORED or (name == "critic_gradient_checkpointing" and command in RL):
            notes.append(f"{flag} {' '.join(values)} ignored (the reference's DeepSpeed / logging / normalisation "
                         "set-up; see 'Coming from safe-rlhf' in the README)".replace("  ", " "))
            continue
        if name in _SWITCHES:
            key = "model.remat" if command in SUPERVISED else "actor.remat"
            notes.append(f"{flag} -> {key}=true")
            out.append(f"{key}=true")
            continue
        if not values:
            raise ConfigError(f"safejax {command}: {flag} needs a value")
        value = f"[{','.join(values)}]" if name in _LISTS else values[0]
        notes.append(f"{flag} -> {table[name]}={value}")
        out.append(f"{table[name]}={value}")
    return out, notes

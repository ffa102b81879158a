"""LoRA in the RL stage (config ``lora.{actor,reward_critic,cost_critic}``, :class:`safejax.models.lora.LoRARoles`).

:func:`lora_models` turns the loaded plain models into LoRA ones; afterwards

* the train state holds only what is trained: the actor's adapters, each critic's adapters + ``score_head``,
  their optimizer states (so checkpoints hold only these, the Lagrange state, rng and data position);
* the frozen tree holds three weight sets, each once: the actor's base (also the reference policy:
  adapters off), the reward model (also the reward critic's backbone) and the cost model (the cost critic's).

:func:`export_actor` writes the merged actor as a plain HF folder (``out_dir/hf``) and, for a LoRA actor, its
adapters in PEFT's layout (``out_dir/hf-lora``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from safejax.models.lora import LoRADef, lora_model
from safejax.models.lora_peft import model_config, write_peft_adapter
from safejax.train.export import write_hf_folder
from safejax.train.ppo import Models, PPOConfig

log = logging.getLogger("safejax")
PEFT_DIR = "hf-lora"


def lora_models(cfg: PPOConfig, models: Models, params: dict) -> tuple[Models, dict]:
    """``(models, params)`` of :func:`safejax.train.ppo_loop.load_models` with the LoRA roles of ``cfg.lora``
    turned into :class:`LoRADef` s: ``params[role]`` becomes the role's trained params and the bases stay in
    ``ref`` (the actor's own params, not a copy), ``reward`` and ``cost``.  Rank-0 roles are unchanged."""
    lc = cfg.lora
    out = dict(params)
    kw = {}
    if lc.actor.rank:
        kw["actor"], out["actor"] = lora_model(models.actor, params["actor"], lc.actor, seed=cfg.seed,
                                               what="lora.actor")
        out["ref"] = params["actor"]
    for i, (role, base) in enumerate((("reward_critic", "reward"), ("cost_critic", "cost")), start=1):
        if getattr(lc, role).rank and getattr(models, role) is not None:
            kw[role], out[role] = lora_model(getattr(models, base), params[base], getattr(lc, role),
                                             seed=cfg.seed + i, what=f"lora.{role}", heads=("score_head",))
    return Models(**{**{f: getattr(models, f) for f in Models.__dataclass_fields__}, **kw}), out


def export_actor(models: Models, actor_params: dict, base: dict, path, tokenizer=None, dtype: str = "float32"):
    """Write the actor as an HF folder at ``path`` (a LoRA actor merged into its ``base``: ``W + alpha/r a@b``)
    and a LoRA actor's adapters as a PEFT folder beside it (``<path>/../hf-lora``).  Returns ``path``."""
    mdef = models.actor
    if not isinstance(mdef, LoRADef):
        return write_hf_folder(mdef.merge(actor_params), path, tokenizer=tokenizer, dtype=dtype)
    merged = jax.jit(mdef.merged_params)(actor_params, base)
    out = write_hf_folder(mdef.base.merge(merged), path, tokenizer=tokenizer, dtype=dtype)
    if model_config(mdef).architecture == "gpt2":
        log.warning("no PEFT adapter folder for a GPT-2 actor (HF fuses its q/k/v); the merged %s has the weights",
                    path)
    else:
        write_peft_adapter(mdef, actor_params, Path(path).parent / PEFT_DIR)
    return out

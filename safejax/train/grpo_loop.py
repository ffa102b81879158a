"""Host side of the critic-free RL stage: load the four models, build the state, jit the phases, run the host loop.

``safejax grpo-lag | grpo --config ...`` -> :func:`run_grpo`.  Everything but the models and the update is the
PPO stage's: prompt loading and its checks (``ppo_loop.load_prompts``), prompt-width buckets, the jit wrappers
(``make_rollout``, ``make_update`` with the non-finite guard), the frozen-model placement, the default held-out
eval hook, :class:`safejax.train.loop.HostLoop` (checkpoints, resume, metrics) and the HF export of the actor.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp

from safejax import parallel
from safejax.data.batching import BatchIterator
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.parallel import make_mesh, resolve_rules
from safejax.train.common import RunDir
from safejax.train.grpo import GRPOConfig, GRPOModels, GRPOPhases, GRPOState
from safejax.train.loop import HostLoop
from safejax.train.ppo_loop import (PPOResult, add_rl_hooks, frozen_models, load_prompts, make_rollout,
                                    make_score_eval_hook, make_update)
from safejax.train.ppo_shapes import bucket_width, prompt_buckets
from safejax.train.sft import export_model
from safejax.train.state import build_state, replicated, trainable
from safejax.train.step_memory import recording_step_memory

log = logging.getLogger("safejax")


def load_grpo_models(cfg: GRPOConfig, mesh, tok, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES
                     ) -> tuple[GRPOModels, dict]:
    """The four models as ``(GRPOModels, params)``: ``params`` has ``actor``, ``ref`` (a copy of the actor's),
    ``reward``, ``cost`` (host trees; ``cost`` None for grpo).  K, the number of constraints, is the cost model's
    ``score_dim``."""

    def score_model(path):
        return split_model(load_model_for(path, mesh, model_type="score", tokenizer=tok, dtype=cfg.actor.dtype,
                                          attention=cfg.actor.attention, rules=rules))

    actor_def, actor = split_model(load_model_for(cfg.actor, mesh, model_type="causal_lm", tokenizer=tok, rules=rules))
    rm_def, rm = score_model(cfg.reward_model)
    cm_def, cm = score_model(cfg.cost_model) if cfg.algorithm == "grpo-lag" else (None, None)
    k = cm_def.merge(cm).score_dim if cm_def is not None else 1  # K constraints: one cost model with K outputs
    models = GRPOModels(actor=actor_def, reward=rm_def, cost=cm_def, num_constraints=k)
    return models, {"actor": actor, "ref": jax.tree.map(jnp.copy, actor), "reward": rm, "cost": cm}


def grpo_state(cfg: GRPOConfig, models: GRPOModels, actor_params, phases: GRPOPhases, mesh,
               rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """``(state, shardings)``: the actor trainable, the multiplier state replicated."""
    return build_state(GRPOState, mesh, cfg.seed,
                       actor=trainable(actor_params, models.actor.shardings(mesh, rules), phases.actor_tx, mesh),
                       lagrange=replicated(phases.init_lagrange(), mesh))


def run_grpo(cfg: GRPOConfig, *, export: bool = True) -> PPOResult:
    """Run the GRPO(-Lag) stage; returns the PPO stage's result record (``phases`` is the widest bucket's
    :class:`GRPOPhases`).  ``data.eval_prompts`` turns on the held-out RM/CM eval every ``train.eval_every``
    iterations and at the end."""
    t0 = time.time()
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.actor)
    models, params = load_grpo_models(cfg, mesh, tok, rules)
    prompts = load_prompts(cfg, tok)
    bsz = cfg.train.batch_size
    n_per_batch = bsz // cfg.rollout.num_return_sequences
    iterations = len(prompts["prompt_ids"]) // n_per_batch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        iterations = min(iterations, cfg.train.max_steps)
    updates = iterations * cfg.grpo.update_iters * (bsz // cfg.grpo.micro_batch_size)

    buckets = prompt_buckets(cfg)
    all_phases = {w: GRPOPhases(cfg, models, prompt_width=w, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                total_updates=updates, unk_id=tok.unk_token_id, max_new_tokens=n)
                  for w, n in buckets}
    phases = all_phases[cfg.data.prompt_width]
    state, state_sh = grpo_state(cfg, models, params["actor"], phases, mesh, rules)
    frozen, frozen_sh = frozen_models(models, params["ref"], params["reward"], params["cost"], mesh, rules)
    rollout_fns = {w: make_rollout(p, mesh, state_sh, frozen_sh, rules) for w, p in all_phases.items()}
    update_fns = {w: make_update(p, mesh, state_sh, skip_nonfinite=cfg.train.skip_nonfinite,
                                 inject_nan_step=cfg.train.inject_nan_step, rules=rules) for w, p in all_phases.items()}
    widest = cfg.data.prompt_width  # XLA's memory analysis of the widest bucket's phases -> step_memory.json
    rollout_fns[widest] = recording_step_memory(rollout_fns[widest], run.path, "rollout")
    update_fns[widest] = recording_step_memory(update_fns[widest], run.path, "update")
    eval_hook = None
    if cfg.data.eval_prompts:
        eval_arrays = load_prompts(cfg, tok, cfg.data.eval_prompts, "eval prompts")
        eval_hook = make_score_eval_hook(rollout_fns[cfg.data.prompt_width], frozen, eval_arrays, n_per_batch, mesh,
                                         cfg.rollout.num_return_sequences, rules)

    prompt_iter = BatchIterator(prompts, n_per_batch, seed=cfg.seed, shuffle=True, drop_last=True)
    run.record_data("prompts", prompts)
    history: list[dict] = []
    result = PPOResult(state, models, phases, tok, history, None, 0.0, mesh)
    host = HostLoop(run, cfg.train, name=cfg.algorithm, total=iterations, iterators={"prompts": prompt_iter},
                    unit="iteration")

    def step(state, batch):
        w = bucket_width(batch["prompt_mask"], buckets)  # left-padded: the last w columns
        batch = parallel.host_local_to_global({k: v[:, -w:] for k, v in batch.items()}, mesh, rules)
        exp = rollout_fns[w](state, frozen, batch["prompt_ids"], batch["prompt_mask"])
        return update_fns[w](state, exp, None)

    add_rl_hooks(host, result, cfg.train.log_every, eval_hook, cfg.train.eval_every, iterations)
    if export:
        host.add_export(lambda st: export_model(models.actor, st.actor.params, run.path / "hf", tok,
                                                dtype=cfg.export.dtype))
    state, _ = host.run_steps(state, step, lambda: iter(prompt_iter))
    result.state, result.export_dir = state, host.exported
    result.seconds = time.time() - t0
    return result

"""Host side of the RL stage: load the six models, build the state, jit the phases, run the host loop.

``safejax ppo-lag | ppo | ppo-reward-shaping --config ...`` -> :func:`run_ppo`.  Per iteration the
host hands a prompt batch to the jitted ``rollout`` (:func:`make_rollout`), hands the experience to the
jitted ``update`` (:func:`make_update`, state donated), and every ``log_every`` iterations pulls the
metrics back (:class:`safejax.train.loop.HostLoop`, the loop every stage runs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from safejax import parallel
from safejax.config import ConfigError
from safejax.data import build_prompts, build_supervised, load_rows
from safejax.data.batching import BatchIterator
from safejax.data.packing import pack_supervised
from safejax.parallel import make_mesh, resolve_rules
from safejax.train.common import SKIP_KEY, RunDir
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.train.loop import HostLoop, to_host
from safejax.train.lagrange_stage import lagrange_state_init
from safejax.train.ppo import Frozen, Models, PPOConfig, PPOPhases, PPOState
from safejax.models.lora import base_def
from safejax.train.ppo_lora import export_actor, lora_models
from safejax.train.ppo_shapes import bucket_width, prompt_buckets, rl_micro_steps
from safejax.train.state import build_state, keep_finite, place, replicated, trainable
from safejax.train.step_memory import recording_step_memory

log = logging.getLogger("safejax")
# what the progress bar shows, when the algorithm logs it: plain PPO has no cost or lambda, shaping a fixed nu
BAR_METRICS = (("train/reward", "reward"), ("train/cost", "cost"), ("train/lambda", "lam"), ("train/nu", "nu"))


@dataclasses.dataclass
class PPOResult:
    state: PPOState
    models: Models
    phases: PPOPhases
    tokenizer: Any
    history: list[dict]
    export_dir: Any
    seconds: float
    mesh: Any


def load_models(cfg: PPOConfig, mesh, tok, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> tuple[Models, dict]:
    """The six models of the RL stage as ``(Models, params)``: ``params`` has ``actor``, ``ref`` (a copy of the
    actor's), ``reward``, ``cost``, ``reward_critic``, ``cost_critic`` (host trees; ``cost`` None without a cost
    model, ``cost_critic`` None unless ppo-lag).  The critics start from the score models unless given.
    LoRA roles (``cfg.lora``) come back as :func:`safejax.train.ppo_lora.lora_models` makes them.

    K, the number of constraints, is the cost model's ``score_dim`` (1 without a cost model); the cost critic
    must have K outputs too, and the per-constraint ``lagrange`` settings K entries (else ConfigError)."""

    def score_model(section, key=None, k=None):
        model = load_model_for(section, mesh, model_type="score", tokenizer=tok, dtype=cfg.actor.dtype,
                               attention=cfg.actor.attention, rules=rules)
        if k is not None and model.score_dim != k:
            raise ConfigError(f"config key '{key}': {section} has {model.score_dim} score outputs but the cost model "
                              f"{cfg.cost_model} has K = {k} (one cost critic head per constraint)")
        return split_model(model)

    actor_def, actor = split_model(load_model_for(cfg.actor, mesh, model_type="causal_lm", tokenizer=tok, rules=rules))
    lc = cfg.lora  # a LoRA role shares its frozen base: no reference copy, no second critic backbone loaded
    ref = jax.tree.map(jnp.copy, actor) if not lc.actor.rank else None
    rm_def, rm = score_model(cfg.reward_model)
    cm_def, cm = score_model(cfg.cost_model) if cfg.cost_model else (None, None)
    k = cm_def.merge(cm).score_dim if cm_def is not None else 1
    cfg.lagrange.check_constraints(k, f"the cost model {cfg.cost_model}")
    if k > 1 and cfg.algorithm == "ppo-reward-shaping":
        raise ConfigError(f"config key 'cost_model': {cfg.cost_model} has K = {k} cost outputs; ppo-reward-shaping "
                          "needs a single cost (use ppo-lag for several constraints)")
    rc_def, rc = (rm_def, None) if lc.reward_critic.rank else score_model(cfg.reward_critic or cfg.reward_model)
    cc_def, cc = ((None, None) if cfg.algorithm != "ppo-lag" else (cm_def, None) if lc.cost_critic.rank
                  else score_model(cfg.cost_critic or cfg.cost_model, "cost_critic" if cfg.cost_critic else "cost_model",
                                   k))
    models = Models(actor=actor_def, reward_critic=rc_def, cost_critic=cc_def, reward=rm_def, cost=cm_def,
                    num_constraints=k)
    params = {"actor": actor, "ref": ref, "reward": rm, "cost": cm, "reward_critic": rc, "cost_critic": cc}
    return lora_models(cfg, models, params) if lc.any else (models, params)


def ppo_state(cfg: PPOConfig, models: Models, params: dict, phases: PPOPhases, mesh,
              rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> tuple[PPOState, PPOState]:
    """``(state, shardings)`` of the RL stage: actor and critics trainable, the Lagrange state replicated.

    ``params``: host params by role (:func:`load_models`); uses ``actor``, ``reward_critic``, ``cost_critic``."""
    lag = lagrange_state_init(cfg.lagrange, models.num_constraints)
    cc = models.cost_critic
    return build_state(
        PPOState, mesh, cfg.seed,
        actor=trainable(params["actor"], models.actor.shardings(mesh, rules), phases.actor_tx, mesh),
        reward_critic=trainable(params["reward_critic"], models.reward_critic.shardings(mesh, rules), phases.critic_tx,
                                mesh),
        cost_critic=(trainable(params["cost_critic"], cc.shardings(mesh, rules), phases.critic_tx, mesh)
                     if cc is not None else (None, None)),
        lagrange=replicated(lag, mesh))


def frozen_models(models: Models, ref, reward, cost, mesh,
                  rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> tuple[Frozen, Frozen]:
    """``(Frozen params placed on their shardings, their shardings)``; ``cost`` may be None."""
    sh = Frozen(ref=base_def(models.actor).shardings(mesh, rules), reward=models.reward.shardings(mesh, rules),
                cost=models.cost.shardings(mesh, rules) if models.cost is not None else None)
    return Frozen(ref=place(ref, sh.ref), reward=place(reward, sh.reward),
                  cost=place(cost, sh.cost) if cost is not None else None), sh


def make_rollout(phases: PPOPhases, mesh, state_shardings, frozen_shardings,
                 rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> Callable:
    """The jitted ``rollout(state, frozen, prompt_ids [B/G, P], prompt_mask [B/G, P]) -> Experience``."""
    bsh = parallel.input_sharding(mesh, 2, rules=rules)
    return parallel.mesh_jit(phases.rollout, mesh=mesh, rules=rules,
                             in_shardings=(state_shardings, frozen_shardings, bsh, bsh))


def make_update(phases: PPOPhases, mesh, state_shardings, *, skip_nonfinite: bool = False,
                inject_nan_step: int = 0, frozen_shardings=None,
                rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> Callable:
    """The jitted ``update(state, exp, ptx[, frozen]) -> (state, metrics)``, state donated, with the numerics
    options of :func:`guarded_update`; ``frozen`` (LoRA models' shared bases) when ``frozen_shardings`` is given."""
    fn = guarded_update(phases.update, skip_nonfinite=skip_nonfinite, inject_nan_step=inject_nan_step,
                        lag=phases.lag)
    in_sh = (state_shardings, None, None) + ((frozen_shardings,) if frozen_shardings is not None else ())
    return parallel.mesh_jit(fn, mesh=mesh, rules=rules, in_shardings=in_sh, out_shardings=(state_shardings, None),
                             donate_argnums=(0,))


def make_score_eval_hook(rollout_fn, frozen, arrays: dict, batch_size: int, mesh, samples_per_prompt: int = 1,
                         rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES, names: list[str] | None = None
                         ) -> Callable[[int, Any], dict]:
    """Default periodic eval: sample ``samples_per_prompt`` answers per held-out prompt with the current actor (the
    same jitted rollout as training, so no extra compile; ``batch_size`` prompts per call) and report the mean RM
    reward and CM cost.  With K cost outputs (``names``: one per constraint) also ``eval/cost/<name>``; then
    ``eval/cost`` is the mean over constraints and ``eval/harmless_ratio`` counts answers with every cost <= 0."""

    def hook(step: int, result: "PPOResult") -> dict:
        n = len(arrays["prompt_ids"])
        rewards, costs = [], []
        for i in range(0, n, batch_size):
            idx = np.arange(i, i + batch_size) % n  # the last batch is padded by repetition
            batch = parallel.host_local_to_global({k: v[idx] for k, v in arrays.items()}, mesh, rules)
            exp = rollout_fn(result.state, frozen, batch["prompt_ids"], batch["prompt_mask"])
            k = min(batch_size, n - i) * samples_per_prompt
            rewards.append(to_host(exp.reward)[:k])
            costs.append(to_host(exp.cost)[:k])
        r, c = np.concatenate(rewards), np.concatenate(costs)
        c2 = c.reshape(len(c), -1)  # [n, K]
        out = {"eval/reward": float(r.mean()), "eval/cost": float(c.mean()),
               "eval/harmless_ratio": float(np.mean(np.all(c2 <= 0, axis=-1))), "eval/count": int(n)}
        out.update({f"eval/cost/{name}": float(c2[:, i].mean()) for i, name in enumerate(names or [])})
        return out

    return hook


def load_prompts(cfg: PPOConfig, tokenizer, specs=None, what: str = "prompts"):
    rows = load_rows(specs or cfg.data.prompts)
    arrays, report = build_prompts(rows, tokenizer, prompt_width=cfg.data.prompt_width,
                                   skip_bad_rows=cfg.data.skip_bad_rows)
    (log.warning if report.dropped else log.info)("%s: %s", what, report)
    need = cfg.train.batch_size // cfg.rollout.num_return_sequences
    if len(arrays.prompt_ids) < (need if what == "prompts" else 1):
        raise ConfigError(f"only {len(arrays.prompt_ids)} usable distinct prompts but train.batch_size="
                         f"{cfg.train.batch_size} needs {need} ({report}; data.prompt_width={cfg.data.prompt_width})")
    return {"prompt_ids": arrays.prompt_ids, "prompt_mask": arrays.prompt_mask}


def run_ppo(cfg: PPOConfig, *, eval_hook: Callable[[int, Any], dict] | None = None, eval_every: int = 0,
            export: bool = True) -> PPOResult:
    """Run the RL stage.  ``eval_hook(iteration, result_so_far) -> metrics`` is called every
    ``eval_every`` iterations (and at the end).  Without a hook, ``data.eval_prompts`` turns on the
    default one (eval/reward, eval/cost, eval/harmless_ratio every ``train.eval_every`` iterations)."""
    t0 = time.time()
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.actor)
    models, params = load_models(cfg, mesh, tok, rules)

    prompts = load_prompts(cfg, tok)
    ptx_arrays = load_ptx(cfg, tok) if cfg.data.ptx and cfg.ppo.ptx_coeff > 0 else None
    bsz = cfg.train.batch_size
    n_per_batch = bsz // cfg.rollout.num_return_sequences  # prompts per rollout (each sampled G times)
    per_epoch = len(prompts["prompt_ids"]) // n_per_batch
    iterations = per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        iterations = min(iterations, cfg.train.max_steps)
    updates = rl_micro_steps(cfg, iterations)

    buckets = prompt_buckets(cfg)  # (prompt width, decode steps) per compiled shape; the widest is `phases`
    all_phases = {w: PPOPhases(cfg, models, mesh, prompt_width=w, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                               total_updates=updates, ptx_enabled=ptx_arrays is not None, unk_id=tok.unk_token_id,
                               max_new_tokens=n) for w, n in buckets}
    phases = all_phases[cfg.data.prompt_width]
    state, state_sh = ppo_state(cfg, models, params, phases, mesh, rules)
    frozen, frozen_sh = frozen_models(models, params["ref"], params["reward"], params["cost"], mesh, rules)
    rollout_fns = {w: make_rollout(p, mesh, state_sh, frozen_sh, rules) for w, p in all_phases.items()}
    lora_sh = frozen_sh if cfg.lora.any else None  # LoRA models read their frozen bases in the update
    update_fns = {w: make_update(p, mesh, state_sh, skip_nonfinite=cfg.train.skip_nonfinite,
                                 inject_nan_step=cfg.train.inject_nan_step, frozen_shardings=lora_sh, rules=rules)
                  for w, p in all_phases.items()}
    widest = cfg.data.prompt_width  # XLA's memory analysis of the widest bucket's phases -> step_memory.json
    rollout_fns[widest] = recording_step_memory(rollout_fns[widest], run.path, "rollout")
    update_fns[widest] = recording_step_memory(update_fns[widest], run.path, "update")
    if eval_hook is None and cfg.data.eval_prompts:
        eval_arrays = load_prompts(cfg, tok, cfg.data.eval_prompts, "eval prompts")
        eval_hook = make_score_eval_hook(rollout_fns[cfg.data.prompt_width], frozen, eval_arrays, n_per_batch, mesh,
                                         cfg.rollout.num_return_sequences, rules,
                                         names=cfg.lagrange.constraint_names(models.num_constraints))
        eval_every = eval_every or cfg.train.eval_every

    prompt_iter = BatchIterator(prompts, n_per_batch, seed=cfg.seed, shuffle=True, drop_last=True)
    iterators = {"prompts": prompt_iter}
    run.record_data("prompts", prompts)
    if ptx_arrays is not None:
        iterators["ptx"] = BatchIterator(ptx_arrays, bsz, seed=cfg.seed + 1, shuffle=True, drop_last=True)
        run.record_data("ptx", ptx_arrays)
    history: list[dict] = []
    result = PPOResult(state, models, phases, tok, history, None, 0.0, mesh)
    host = HostLoop(run, cfg.train, name=cfg.algorithm, total=iterations, iterators=iterators, unit="iteration")

    def batches():
        ptx_it = iter(iterators["ptx"]) if "ptx" in iterators else None
        for batch in prompt_iter:
            yield batch, (next(ptx_it) if ptx_it is not None else None)

    def step(state, batch_ptx):
        batch, ptx = batch_ptx
        w = bucket_width(batch["prompt_mask"], buckets)  # left-padded: the last w columns
        batch = parallel.host_local_to_global({k: v[:, -w:] for k, v in batch.items()}, mesh, rules)
        exp = rollout_fns[w](state, frozen, batch["prompt_ids"], batch["prompt_mask"])
        ptx = parallel.host_local_to_global(ptx, mesh, rules) if ptx is not None else None
        return update_fns[w](state, exp, ptx, *((frozen,) if cfg.lora.any else ()))

    add_rl_hooks(host, result, cfg.train.log_every, eval_hook, eval_every, iterations)
    if export:
        host.add_export(lambda st: export_actor(models, st.actor.params, frozen.ref, run.path / "hf", tok,
                                                dtype=cfg.export.dtype))
    state, _ = host.run_steps(state, step, batches)
    result.state, result.export_dir = state, host.exported
    result.seconds = time.time() - t0
    return result


def add_rl_hooks(host: HostLoop, result: PPOResult, log_every: int, eval_hook: Callable[[int, Any], dict] | None,
                 eval_every: int, iterations: int) -> None:
    """The RL stages' hooks on ``host``: every ``log_every`` iterations the metrics (into ``result.history`` and the
    progress bar); with ``eval_hook``, the held-out eval every ``eval_every`` iterations and after the last."""

    def log_hook(h: HostLoop, step: int, state) -> None:
        metrics = h.log(step)
        result.history.append(dict(metrics, step=step))
        h.bar.set_postfix({short: f"{metrics[key]:.2f}" for key, short in BAR_METRICS if key in metrics})

    def eval_step(h: HostLoop, step: int, state) -> None:
        result.state = state
        em = eval_hook(step, result)
        h.write(step, em)
        result.history.append(dict(em, step=step))

    host.add_hook(log_hook, every=log_every)
    if eval_hook is not None:
        host.add_hook(eval_step, when=lambda s: bool(eval_every and s % eval_every == 0 and s != iterations))
        host.add_end_hook(eval_step)


def load_ptx(cfg: PPOConfig, tokenizer) -> dict:
    """The ptx (pretraining) rows, packed when ``data.ptx_pack``: ``input_ids``, ``attention_mask``, ``loss_mask``
    (+ ``segment_ids``, ``positions`` when packed), ``[rows, data.ptx_max_length]``."""
    arrays, report = build_supervised(load_rows(cfg.data.ptx), tokenizer, max_length=cfg.data.ptx_max_length,
                                      skip_bad_rows=cfg.data.skip_bad_rows)
    (log.warning if report.dropped else log.info)("ptx: %s", report)
    if cfg.data.ptx_pack:
        packed = pack_supervised(arrays)
        return {**packed, "loss_mask": packed.pop("label_mask")}
    return {"input_ids": arrays.input_ids, "attention_mask": arrays.attention_mask, "loss_mask": arrays.label_mask}


def guarded_update(update: Callable, *, skip_nonfinite: bool, inject_nan_step: int, lag: bool) -> Callable:
    """Wrap ``PPOPhases.update(state, exp, ptx) -> (state, metrics)`` with the numerics options.

    ``inject_nan_step`` (> 0, a test hook): at that iteration (1-based) the experience's episode costs
    (PPO-Lag; else the rewards) are NaN, which poisons the cost window, lambda, advantages, losses and
    params.  ``skip_nonfinite``: an iteration whose metrics are not all finite keeps the previous
    state (only ``step`` advances) and reports ``train/nonfinite_skipped = 1``.  With both off the
    update is returned unchanged."""
    if not skip_nonfinite and inject_nan_step <= 0:
        return update

    def wrapped(state, exp, ptx, *frozen):
        if inject_nan_step > 0:
            hit = state.step + 1 == inject_nan_step
            if lag:
                exp = exp.replace(cost=jnp.where(hit, jnp.float32(jnp.nan), exp.cost))
            else:
                exp = exp.replace(reward=jnp.where(hit, jnp.float32(jnp.nan), exp.reward))
        new, metrics = update(state, exp, ptx, *frozen)
        if skip_nonfinite:
            new, skipped = keep_finite(state, new, metrics)
            metrics = dict(metrics, **{"train/" + SKIP_KEY: skipped})
        return new, metrics

    return wrapped

"""Host loop of the RL stage: load the six models, build the state, run iterations, log, checkpoint.

``safejax ppo-lag | ppo | ppo-reward-shaping --config ...`` -> :func:`run_ppo`.  Per iteration the
host does three things: hand a prompt batch to the jitted ``rollout``, hand the experience to the
jitted ``update`` (state donated), and every ``log_every`` iterations pull the metrics back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from safejax import parallel, rl
from safejax.config import ConfigError
from safejax.parallel import make_mesh
from safejax.train.common import (SKIP_KEY, GracefulStop, MetricGuard, Preempted, RunDir, close_stage, progress,
                                  save_checkpoint, scalar_on_mesh)
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.train.ppo import Frozen, Models, ModelState, PPOConfig, PPOState, Trainer
from safejax.train.ppo_shapes import bucket_width, prompt_buckets, rl_micro_steps
from safejax.train.sft import export_model

log = logging.getLogger("safejax")
# what the progress bar shows, when the algorithm logs it: plain PPO has no cost or lambda, shaping a fixed nu
BAR_METRICS = (("train/reward", "reward"), ("train/cost", "cost"), ("train/lambda", "lam"), ("train/nu", "nu"))


@dataclasses.dataclass
class PPOResult:
    state: PPOState
    models: Models
    trainer: Trainer
    tokenizer: Any
    history: list[dict]
    export_dir: Any
    seconds: float
    mesh: Any


def _model_state(mdef, params, tx, mesh):
    sh = mdef.shardings(mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, sh)
    opt_sh = parallel.opt_state_shardings(tx, params, sh, mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return ModelState(params, opt), ModelState(sh, opt_sh)


def _replicate(tree, mesh):
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), tree), jax.tree.map(lambda _: rep, tree)


def make_score_eval_hook(rollout_fn, frozen, arrays: dict, batch_size: int, mesh, samples_per_prompt: int = 1
                         ) -> Callable[[int, Any], dict]:
    """Default periodic eval: sample ``samples_per_prompt`` answers per held-out prompt with the current actor (the
    same jitted rollout as training, so no extra compile; ``batch_size`` prompts per call) and report the mean RM
    reward and CM cost."""

    def hook(step: int, result: "PPOResult") -> dict:
        n = len(arrays["prompt_ids"])
        rewards, costs = [], []
        for i in range(0, n, batch_size):
            idx = np.arange(i, i + batch_size) % n  # the last batch is padded by repetition
            batch = parallel.host_local_to_global({k: v[idx] for k, v in arrays.items()}, mesh)
            exp = rollout_fn(result.state, frozen, batch["prompt_ids"], batch["prompt_mask"])
            k = min(batch_size, n - i) * samples_per_prompt
            rewards.append(np.asarray(_gather(exp.reward))[:k])
            costs.append(np.asarray(_gather(exp.cost))[:k])
        r, c = np.concatenate(rewards), np.concatenate(costs)
        return {"eval/reward": float(r.mean()), "eval/cost": float(c.mean()),
                "eval/harmless_ratio": float(np.mean(c <= 0)), "eval/count": int(n)}

    return hook


def _gather(x):
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def load_prompts(cfg: PPOConfig, tokenizer, specs=None, what: str = "prompts"):
    from safejax.data import build_prompts, load_rows

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
    from safejax.data import build_supervised, load_rows
    from safejax.data.batching import BatchIterator
    from safejax.data.packing import pack_supervised

    t0 = time.time()
    mesh = make_mesh(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.actor)
    lag = cfg.algorithm == "ppo-lag"

    actor = load_model_for(cfg.actor, mesh, model_type="causal_lm", tokenizer=tok)
    actor_def, actor_params = split_model(actor)
    ref_params = jax.tree.map(jnp.copy, actor_params)
    dtype = cfg.actor.dtype
    rm_def, rm_params = split_model(load_model_for(cfg.reward_model, mesh, model_type="score", tokenizer=tok,
                                                   dtype=dtype, attention=cfg.actor.attention))
    cm_def, cm_params = None, None
    if cfg.cost_model:
        cm_def, cm_params = split_model(load_model_for(cfg.cost_model, mesh, model_type="score", tokenizer=tok,
                                                       dtype=dtype, attention=cfg.actor.attention))
    rc_def, rc_params = split_model(load_model_for(cfg.reward_critic or cfg.reward_model, mesh, model_type="score",
                                                   tokenizer=tok, dtype=dtype, attention=cfg.actor.attention))
    cc_def, cc_params = (None, None)
    if lag:
        cc_def, cc_params = split_model(load_model_for(cfg.cost_critic or cfg.cost_model, mesh, model_type="score",
                                                       tokenizer=tok, dtype=dtype, attention=cfg.actor.attention))
    models = Models(actor=actor_def, reward_critic=rc_def, cost_critic=cc_def, reward=rm_def, cost=cm_def)

    prompts = load_prompts(cfg, tok)
    ptx_arrays = None
    if cfg.data.ptx and cfg.ppo.ptx_coeff > 0:
        ptx_arrays, rep = build_supervised(load_rows(cfg.data.ptx), tok, max_length=cfg.data.ptx_max_length,
                                           skip_bad_rows=cfg.data.skip_bad_rows)
        (log.warning if rep.dropped else log.info)("ptx data: %s", rep)
        if cfg.data.ptx_pack:
            packed = pack_supervised(ptx_arrays)
            ptx_arrays = {**packed, "loss_mask": packed.pop("label_mask")}
        else:
            ptx_arrays = {"input_ids": ptx_arrays.input_ids, "attention_mask": ptx_arrays.attention_mask,
                          "loss_mask": ptx_arrays.label_mask}
    n_prompts = len(prompts["prompt_ids"])
    bsz = cfg.train.batch_size
    n_per_batch = bsz // cfg.rollout.num_return_sequences  # prompts per rollout (each sampled G times)
    if n_prompts < n_per_batch:
        raise ConfigError(f"only {n_prompts} distinct prompts but train.batch_size={bsz} needs {n_per_batch}")
    per_epoch = n_prompts // n_per_batch
    iterations = per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        iterations = min(iterations, cfg.train.max_steps)
    updates = rl_micro_steps(cfg, iterations)

    buckets = prompt_buckets(cfg)  # (prompt width, decode steps) per compiled shape; the widest is `trainer`
    trainers = {w: Trainer(cfg, models, mesh, prompt_width=w, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                           total_updates=updates, ptx_enabled=ptx_arrays is not None, unk_id=tok.unk_token_id,
                           max_new_tokens=n) for w, n in buckets}
    trainer = trainers[cfg.data.prompt_width]

    # ---- state (sharded) and frozen models
    actor_s, actor_sh = _model_state(actor_def, actor_params, trainer.actor_tx, mesh)
    rc_s, rc_sh = _model_state(rc_def, rc_params, trainer.critic_tx, mesh)
    cc_s, cc_sh = (None, None)
    if lag:
        cc_s, cc_sh = _model_state(cc_def, cc_params, trainer.critic_tx, mesh)
    lag_state, lag_sh = _replicate(rl.lagrange_init(cfg.lagrange.lambda_init, num_constraints=1,
                                                    window_size=cfg.lagrange.window,
                                                    lambda_lr=cfg.lagrange.lambda_lr), mesh)
    rep = NamedSharding(mesh, P())
    rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), rep)
    state = PPOState(step=scalar_on_mesh(0, mesh), actor=actor_s, reward_critic=rc_s, cost_critic=cc_s,
                     lagrange=lag_state, rng=rng)
    state_sh = PPOState(step=rep, actor=actor_sh, reward_critic=rc_sh, cost_critic=cc_sh, lagrange=lag_sh, rng=rep)

    def put(params, mdef):
        sh = mdef.shardings(mesh)
        return jax.tree.map(lambda x, s: jax.device_put(x, s), params, sh), sh

    ref_p, ref_sh = put(ref_params, actor_def)
    rm_p, rm_sh = put(rm_params, rm_def)
    cm_p, cm_sh = put(cm_params, cm_def) if cm_def is not None else (None, None)
    frozen = Frozen(ref=ref_p, reward=rm_p, cost=cm_p)
    frozen_sh = Frozen(ref=ref_sh, reward=rm_sh, cost=cm_sh)

    bsh = parallel.batch_sharding(mesh, 2)
    rollout_fns = {w: parallel.mesh_jit(t.rollout, mesh=mesh, in_shardings=(state_sh, frozen_sh, bsh, bsh))
                   for w, t in trainers.items()}
    rollout_fn = rollout_fns[cfg.data.prompt_width]
    if eval_hook is None and cfg.data.eval_prompts:
        eval_arrays = load_prompts(cfg, tok, cfg.data.eval_prompts, "eval prompts")
        eval_hook = make_score_eval_hook(rollout_fn, frozen, eval_arrays, n_per_batch, mesh,
                                         cfg.rollout.num_return_sequences)
        eval_every = eval_every or cfg.train.eval_every
    update_fns = {w: parallel.mesh_jit(guarded_update(t.update, skip_nonfinite=cfg.train.skip_nonfinite,
                                                      inject_nan_step=cfg.train.inject_nan_step, lag=lag),
                                       mesh=mesh, in_shardings=(state_sh, None, None), out_shardings=(state_sh, None),
                                       donate_argnums=(0,)) for w, t in trainers.items()}

    # ---- resume
    prompt_iter = BatchIterator(prompts, n_per_batch, seed=cfg.seed, shuffle=True, drop_last=True)
    ptx_iter = (BatchIterator(ptx_arrays, bsz, seed=cfg.seed + 1, shuffle=True, drop_last=True)
                if ptx_arrays is not None else None)
    run.record_data("prompts", prompts)
    if ptx_arrays is not None:
        run.record_data("ptx", ptx_arrays)
    ckpt = run.checkpointer(cfg.train.keep_checkpoints)
    writer = None
    bar = None
    try:
        restored = ckpt.restore(state, required_meta=("prompts",) + (("ptx",) if ptx_iter is not None else ()))
        start, meta = 0, {}
        guard = MetricGuard(max_consecutive=cfg.train.max_consecutive_skips)
        if restored is not None:
            state, meta, start = restored
            prompt_iter.restore(meta["prompts"])
            if ptx_iter is not None:
                ptx_iter.restore(meta["ptx"])
            guard.restore(meta)
            log.info("%s: resumed from iteration %d in %s", cfg.algorithm, start, ckpt.directory)
        run.write_config()
        from safejax.metrics import MetricWriter

        writer = MetricWriter(run.path, resume_step=start if restored is not None else None,
                              resume_offset=meta.get("metrics_offset"))

        history: list[dict] = []
        result = PPOResult(state, models, trainer, tok, history, None, 0.0, mesh)
        bar = progress(iterations, cfg.algorithm, cfg.train.progress, initial=start)
        it = iter(prompt_iter)
        ptx_it = iter(ptx_iter) if ptx_iter is not None else None
        step = start
        with GracefulStop() as stop:
            while step < iterations:
                batch = next(it)
                w = bucket_width(batch["prompt_mask"], buckets)  # left-padded: the last w columns
                batch = parallel.host_local_to_global({k: v[:, -w:] for k, v in batch.items()}, mesh)
                exp = rollout_fns[w](state, frozen, batch["prompt_ids"], batch["prompt_mask"])
                ptx = parallel.host_local_to_global(next(ptx_it), mesh) if ptx_it is not None else None
                state, m = update_fns[w](state, exp, ptx)
                step += 1
                guard.add(step, m)
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == iterations:
                    metrics = guard.drain()[step]
                    if cfg.train.skip_nonfinite:
                        metrics["train/" + SKIP_KEY + "_total"] = guard.skipped
                    writer.write(step, metrics)
                    history.append(dict(metrics, step=step))
                    bar.set_postfix({short: f"{metrics[key]:.2f}" for key, short in BAR_METRICS if key in metrics})
                if eval_hook is not None and eval_every and step % eval_every == 0 and step != iterations:
                    result.state = state
                    em = eval_hook(step, result)
                    writer.write(step, em)
                    history.append(dict(em, step=step))
                stop_now = stop.requested_now()
                save_now = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == iterations
                if save_now or stop_now:
                    meta = {"prompts": prompt_iter.state()}
                    if ptx_iter is not None:
                        meta["ptx"] = ptx_iter.state()
                    save_checkpoint(ckpt, step, state, guard, writer, meta)
                if stop_now:
                    raise Preempted(f"{cfg.algorithm}: SIGTERM received; saved a checkpoint at iteration {step}/"
                                    f"{iterations} in {ckpt.directory}; rerun the same command to resume", step)
        result.state = state
        if eval_hook is not None:
            em = eval_hook(step, result)
            writer.write(step, em)
            history.append(dict(em, step=step))
    finally:
        close_stage(run, bar, writer)
    if export:
        result.export_dir = export_model(actor_def, state.actor.params, run.path / "hf", tok, dtype=cfg.export.dtype)
    result.seconds = time.time() - t0
    return result


def guarded_update(update: Callable, *, skip_nonfinite: bool, inject_nan_step: int, lag: bool) -> Callable:
    """Wrap ``Trainer.update(state, exp, ptx) -> (state, metrics)`` with the numerics options.

    ``inject_nan_step`` (> 0, a test hook): at that iteration (1-based) the experience's episode costs
    (PPO-Lag; else the rewards) are NaN, which poisons the cost window, lambda, advantages, losses and
    params.  ``skip_nonfinite``: an iteration whose metrics are not all finite keeps the previous
    state (only ``step`` advances) and reports ``train/nonfinite_skipped = 1``.  With both off the
    update is returned unchanged."""
    if not skip_nonfinite and inject_nan_step <= 0:
        return update

    def wrapped(state, exp, ptx):
        if inject_nan_step > 0:
            hit = state.step + 1 == inject_nan_step
            if lag:
                exp = exp.replace(cost=jnp.where(hit, jnp.float32(jnp.nan), exp.cost))
            else:
                exp = exp.replace(reward=jnp.where(hit, jnp.float32(jnp.nan), exp.reward))
        new, metrics = update(state, exp, ptx)
        if skip_nonfinite:
            leaves = [jnp.asarray(v) for v in jax.tree.leaves(metrics)]  # constant schedules give Python floats
            ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves if jnp.issubdtype(v.dtype, jnp.inexact)]))
            kept = state.replace(step=state.step + 1)
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept)
            metrics = dict(metrics, **{"train/" + SKIP_KEY: (~ok).astype(jnp.float32)})
        return new, metrics

    return wrapped

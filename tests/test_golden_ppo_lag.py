"""Parity with golden data made by the reference trainer's own update code (safe-rlhf e8cca16).

Every case under ``<golden>/expected/*/summary.json`` is driven through the same load path
(``load_model_for``: HF Llama actor, safe-rlhf ``LlamaForScore`` critics whose normaliser buffers are ignored)
and the same jitted ``PPOPhases.update`` that ``safejax ppo-lag`` runs; the case's experience arrays stand in
for the rollout's output.  Every hyper-parameter and the geometry come from the case's ``summary.json`` and
input arrays (:func:`ppo_config_from_reference_args`), so any folder of the same layout is checked the same
way.  Tolerances are the README's recommended ones (float32 on CPU, highest matmul precision).

The golden folder defaults to ``../shared/golden/ppo_lag_update`` beside the checkout; the environment variable
``SAFEJAX_GOLDEN_PPO_LAG`` overrides it.  Without it the tests skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safejax import rl
from safejax.models.hf import hf_state_dict
from safejax.parallel import MeshConfig, make_mesh
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for
from safejax.train.ppo import Experience, Models, PPOPhases, PPOState
from safejax.train.ppo_shapes import rl_micro_steps
from safejax.train.ppo_loop import make_update
from safejax.train.state import build_state, replicated, trainable
from safejax.train.reference_args import ppo_config_from_reference_args

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SAFEJAX_GOLDEN_PPO_LAG") or REPO.parent / "shared" / "golden" / "ppo_lag_update")
MODELS = ("actor", "reward_critic", "cost_critic")


def _case_names():
    expected = GOLDEN / "expected"
    names = sorted(p.name for p in expected.iterdir() if (p / "summary.json").is_file()) if expected.is_dir() else []
    if not names:
        return [pytest.param("none", marks=pytest.mark.skip(
            reason=f"no golden PPO-Lag data at {GOLDEN} (set SAFEJAX_GOLDEN_PPO_LAG to a golden folder)"))]
    return names


CASES = _case_names()
_RUNS: dict = {}


def _np(x):
    return np.asarray(jax.device_get(x))


def _hf(mdef, tree) -> dict:
    """Our params (or grads) tree -> HF-named float32 arrays, HF layouts."""
    return hf_state_dict(mdef.merge(jax.tree.map(jnp.asarray, _np_tree(tree))))


def _np_tree(tree):
    return jax.tree.map(_np, tree)


def _build(case: str, update_iters: int | None = None):
    """Load everything for ``case``; ``update_iters`` overrides the case's (the schedule keeps the case's span)."""
    summary = json.loads((GOLDEN / "expected" / case / "summary.json").read_text())
    hp = summary["hyperparameters"]
    use_ptx = bool(summary["use_ptx"])
    exp_np = dict(np.load(GOLDEN / summary["experience"]))
    pad, unk, _bos, eos = (int(x) for x in exp_np["special_ids"])
    cfg = ppo_config_from_reference_args(hp, use_ptx=use_ptx)
    cfg.mesh = MeshConfig(data=1, fsdp=1, tensor=1)
    b, width = exp_np["prompt"].shape
    iterations = b // cfg.train.batch_size        # prompt batches in the golden run
    micro_steps = rl_micro_steps(cfg, iterations)  # the schedule spans the whole run
    if update_iters is not None:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, update_iters=update_iters))
    mesh = make_mesh(cfg.mesh)

    def load(name, kind):
        return split_model(load_model_for(str(GOLDEN / "models" / name), mesh, model_type=kind))

    (a_def, a_p), (_, ref_p) = load("actor", "causal_lm"), load("ref", "causal_lm")
    (rc_def, rc_p), (cc_def, cc_p) = load("reward_critic", "score"), load("cost_critic", "score")
    models = Models(actor=a_def, reward_critic=rc_def, cost_critic=cc_def, reward=rc_def, cost=cc_def)
    phases = PPOPhases(cfg, models, mesh, prompt_width=width, eos_id=eos, pad_id=pad, total_updates=micro_steps,
                       ptx_enabled=use_ptx, unk_id=unk, trace=True)
    lc = cfg.lagrange
    lag = rl.lagrange_init(lc.lambda_init, window_size=lc.window, lambda_lr=lc.lambda_lr)
    prior = exp_np["prior_episode_costs"]
    if prior.size:
        lag = rl.lagrange_record(lag, jnp.asarray(prior, jnp.float32))
    state, state_sh = build_state(PPOState, mesh, 0,
                                  actor=trainable(a_p, a_def.shardings(mesh), phases.actor_tx, mesh),
                                  reward_critic=trainable(rc_p, rc_def.shardings(mesh), phases.critic_tx, mesh),
                                  cost_critic=trainable(cc_p, cc_def.shardings(mesh), phases.critic_tx, mesh),
                                  lagrange=replicated(lag, mesh))

    seq = jnp.asarray(exp_np["input_ids"], jnp.int32)
    mask = jnp.asarray(exp_np["attention_mask"], jnp.bool_)
    start = width - 1
    exp = Experience(seq, mask, *(jnp.asarray(exp_np[k][:, start:], jnp.float32) for k in
                                  ("old_log_probs", "ref_log_probs")),
                     jnp.asarray(exp_np["reward"], jnp.float32), jnp.asarray(exp_np["cost"], jnp.float32),
                     *(jnp.asarray(exp_np[k][:, start:], jnp.float32) for k in ("reward_values", "cost_values")),
                     phases.action_mask(mask))
    ptx = None
    if use_ptx:
        p = dict(np.load(GOLDEN / "inputs" / "ptx.npz"))
        ptx = {"input_ids": jnp.asarray(p["input_ids"], jnp.int32),
               "attention_mask": jnp.asarray(p["attention_mask"], jnp.bool_),
               "loss_mask": jnp.asarray(p["labels"] != -100)}
    update_fn = make_update(phases, mesh, state_sh)
    return dict(summary=summary, cfg=cfg, phases=phases, state=state, exp=exp, ptx=ptx, exp_np=exp_np,
                ref_params=ref_p, update_fn=update_fn, start=start, micro_steps=micro_steps)


def _run(case: str) -> dict:
    if case in _RUNS:
        return _RUNS[case]
    full = _build(case)
    tr: PPOPhases = full["phases"]
    state0 = full["state"]
    models = tr.models
    defs = {"actor": models.actor, "reward_critic": models.reward_critic, "cost_critic": models.cost_critic}
    params0 = {k: _np_tree(getattr(state0, k).params) for k in MODELS}

    # rollout scoring of the given sequences (the rollout's forward, incl. its positions)
    scores = jax.jit(tr.score)(state0, full["ref_params"], full["exp"].sequences, full["exp"].attention_mask)

    # the first optimizer step's accumulated gradients, from the same functions the update differentiates
    lag_state, data, _ = jax.jit(tr.prepare)(state0, full["exp"])
    out = {"scores": [_np(x) for x in scores], "params0": params0}

    # the jitted update, as `safejax ppo-lag` runs it: all update iterations, then only the first one
    state2, metrics = full["update_fn"](state0, full["exp"], full["ptx"])
    out["trace"] = _np_tree(metrics.pop("trace"))
    out["metrics"] = _np_tree(metrics)
    # params after update iteration i: the same update with update_iters = i (the schedules keep the run's span)
    total_iters = full["cfg"].ppo.update_iters
    out["params"] = {total_iters: {k: _hf(defs[k], getattr(state2, k).params) for k in MODELS}}
    for i in _snapshot_iters(case):
        if i != total_iters:
            part = _build(case, update_iters=i)
            state_i, _ = part["update_fn"](part["state"], part["exp"], part["ptx"])
            out["params"][i] = {k: _hf(defs[k], getattr(state_i, k).params) for k in MODELS}

    # grads of the first optimizer step of each model: the mean over its first grad_accum micro-steps, at the
    # initial params (they do not move inside an accumulation window), with the lambda each micro-step used
    mbs = full["cfg"].ppo.micro_batch_size
    nmb = full["exp"].sequences.shape[0] // mbs
    lam = out["trace"]["lambda_used"].reshape(-1)
    p0 = {k: jax.tree.map(jnp.asarray, v) for k, v in params0.items()}

    def micro(k):
        j = k % nmb
        mb = jax.tree.map(lambda x: x[j * mbs:(j + 1) * mbs], data)
        pb = None if full["ptx"] is None else jax.tree.map(
            lambda x: x[j * (x.shape[0] // nmb):(j + 1) * (x.shape[0] // nmb)], full["ptx"])
        return mb, pb

    actor_grads = jax.jit(tr.actor_grads)
    critic_grads = jax.jit(tr.critic_grads, static_argnums=(2,))
    grads = {}
    for name, ga in (("actor", full["cfg"].actor_optim.grad_accum),
                     ("reward_critic", full["cfg"].critic_optim.grad_accum),
                     ("cost_critic", full["cfg"].critic_optim.grad_accum)):
        acc = None
        for k in range(ga):
            mb, pb = micro(k)
            if name == "actor":
                g = actor_grads(p0[name], mb, pb, jnp.float32(lam[k]))[0]
            else:
                g = critic_grads(p0[name], mb, "r" if name == "reward_critic" else "c")[0]
            acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        grads[name] = _hf(defs[name], jax.tree.map(lambda x: x / ga, acc))
    out["grads0"] = grads
    out["full"] = full
    _RUNS[case] = out
    return out


def _snapshot_iters(case) -> list[int]:
    """Update iterations with a parameter snapshot (``expected/<case>/iter<i>/``)."""
    return sorted(int(p.name[4:]) for p in (GOLDEN / "expected" / case).glob("iter*") if p.name[4:].isdigit())


def _case_iters():
    return [(c, i) for c in CASES for i in (_snapshot_iters(c) if isinstance(c, str) and c != "none" else [])] or \
        [pytest.param("none", 0, marks=pytest.mark.skip(reason=f"no golden PPO-Lag data at {GOLDEN}"))]


def _steps(case):
    run = _run(case)
    summary = run["summary"] = run["full"]["summary"]
    steps = dict(np.load(GOLDEN / "expected" / case / "steps.npz"))
    return run, summary, steps


def _flat(x):
    """``[update_iters, mini-batches, ...]`` trace entry -> ``[micro-steps, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def _close(name, got, want, *, atol, rtol=0.0, mask=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    bad = err > bound
    if mask is not None:
        bad &= np.asarray(mask, bool)
    assert not bad.any(), (f"{name}: {int(bad.sum())} entries off; max |err| {float(err[bad].max()):.3g} "
                           f"(atol {atol}, rtol {rtol}) at {np.argwhere(bad)[:4].tolist()}")


@pytest.mark.parametrize("case", CASES)
def test_rollout_scoring_reproduces_golden_log_probs_and_values(case):
    """The rollout's forward (positions follow the layout, a mask hole stays out of attention) on the given
    sequences reproduces the reference's old / ref log-probs and critic values where query and target are real."""
    run, _, _ = _steps(case)
    e = run["full"]["exp_np"]
    start = run["full"]["start"]
    valid = (e["attention_mask"][:, :-1] & e["attention_mask"][:, 1:])[:, start:]
    for got, key in zip(run["scores"], ("old_log_probs", "ref_log_probs", "reward_values", "cost_values")):
        _close(f"{case}/rollout/{key}", got, e[key][:, start:], atol=1e-5, mask=valid)


@pytest.mark.parametrize("case", CASES)
def test_lambda_shaping_advantages_match_golden_per_step(case):
    run, summary, steps = _steps(case)
    tr = run["trace"]
    mask = run["full"]["exp_np"]["attention_mask"][:, run["full"]["start"] + 1:]
    n_steps = len(summary["steps"])
    assert _flat(tr["lambda_used"]).shape[0] == n_steps == summary["total_training_steps"] == run["full"]["micro_steps"]
    for k, s in enumerate(summary["steps"]):
        _close(f"{case}/step{k}/log_lambda_before", _flat(tr["log_lambda_before"])[k], s["log_lambda_before"],
               atol=1e-6)
        _close(f"{case}/step{k}/log_lambda_after", _flat(tr["log_lambda"])[k], s["log_lambda_after_update"],
               atol=1e-6)
        _close(f"{case}/step{k}/lambda_used", _flat(tr["lambda_used"])[k], s["lambda_used"], atol=0, rtol=1e-6)
        rows = steps[f"step{k}/rows"]
        m = mask[rows]
        start = run["full"]["start"]
        for ours, gold in (("rewards", "old_rewards"), ("costs", "old_costs")):
            _close(f"{case}/step{k}/{gold}", tr[ours][rows], steps[f"step{k}/{gold}"][:, start:], atol=1e-6, mask=m)
        for ours, gold in (("adv_r", "reward_advantages"), ("ret_r", "reward_returns"),
                           ("adv_c", "cost_advantages"), ("ret_c", "cost_returns")):
            _close(f"{case}/step{k}/{gold}", tr[ours][rows], steps[f"step{k}/{gold}"], atol=1e-5, rtol=1e-5, mask=m)
        _close(f"{case}/step{k}/combined_advantages", _flat(tr["combined_advantages"])[k],
               steps[f"step{k}/combined_advantages"], atol=1e-5, rtol=1e-5, mask=m)
        for key in ("log_probs", "ratios", "reward_values", "cost_values"):
            _close(f"{case}/step{k}/{key}", _flat(tr[key])[k], steps[f"step{k}/{key}"], atol=2e-5, mask=m)
    logged = summary["steps"][-1]["logged"]["train/episode_cost"]
    _close(f"{case}/episode_cost", run["metrics"]["train/episode_cost"], logged, atol=0, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_losses_and_every_optimizer_step_lr_match_golden(case):
    run, summary, _ = _steps(case)
    tr = run["trace"]
    keys = ["actor_loss", "reward_critic_loss", "cost_critic_loss"] + (["ptx_loss"] if summary["use_ptx"] else [])
    for k, s in enumerate(summary["steps"]):
        for key in keys:
            _close(f"{case}/step{k}/{key}", _flat(tr[key])[k], s[key], atol=1e-6, rtol=2e-5)
    for name in MODELS:
        gold = summary["optimizer_steps"][name]
        count = _flat(tr[f"{name}_updates"])
        fired = np.flatnonzero(np.diff(np.concatenate([[0], count])) > 0)
        assert len(fired) == len(gold), f"{case}/{name}: {len(fired)} optimizer steps, golden {len(gold)}"
        # the reference counts the actor's ptx micro-steps too: engine micro-steps per RL micro-step
        ga = summary["hyperparameters"]["gradient_accumulation_steps"]
        per_rl = summary["actor_gradient_accumulation_steps"] // ga if name == "actor" else 1
        for i, (k, g) in enumerate(zip(fired, gold)):
            assert k == g["micro_step"] // per_rl, \
                f"{case}/{name}: optimizer step {i} after micro-step {k}, golden {g['micro_step']}"
            _close(f"{case}/{name}/opt{i}/lr", _flat(tr[f"{name}_lr"])[k], g["lr_applied"], atol=1e-12, rtol=1e-6)
            _close(f"{case}/{name}/opt{i}/grad_norm", _flat(tr[f"{name}_grad_norm"])[k], g["grad_norm_before_clip"],
                   atol=0, rtol=2e-5)
        _close(f"{case}/{name}/logged_lr", run["metrics"][f"train/{name}_lr"], gold[-1]["lr_applied"], atol=1e-12,
               rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_first_step_gradients_match_golden(case):
    run, _, _ = _steps(case)
    for name in MODELS:
        gold = dict(np.load(GOLDEN / "expected" / case / "grads_step0" / f"{name}.npz"))
        ours = run["grads0"][name]
        assert set(gold) <= set(ours), f"{case}/{name}: missing grads {sorted(set(gold) - set(ours))[:4]}"
        for key, g in gold.items():
            tol = 2e-5 * float(np.max(np.abs(g)))
            _close(f"{case}/grads_step0/{name}/{key}", ours[key], g, atol=tol)


@pytest.mark.parametrize("case,it", _case_iters())
def test_params_after_each_update_iteration_match_golden(case, it):
    run, _, _ = _steps(case)
    for name in MODELS:
        gold = dict(np.load(GOLDEN / "expected" / case / f"iter{it}" / f"{name}.npz"))
        ours = run["params"][it][name]
        assert set(gold) == set(ours), f"{case}/{name}: params differ {sorted(set(gold) ^ set(ours))[:4]}"
        for key, p in gold.items():
            _close(f"{case}/iter{it}/{name}/{key}", ours[key], p, atol=2e-6, rtol=1e-6)

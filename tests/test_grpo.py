"""The critic-free RL stage (safejax.train.grpo / grpo_loop): the whole GRPO-Lag update loss against NumPy (with the
log-probs from transformers), the CLI commands end to end, named bad-input errors and bit-exact resume."""

from __future__ import annotations

import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny_world
from hf_reference import hf_logits
from safejax.cli import main
from safejax.metrics import read_metrics
from test_resume import KILL_SEED, _kill_chain, _ok, _state, run_stage
from test_rl_group import np_group_advantages

ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


# ----------------------------------------------------------------------------- parity of the update loss


@pytest.fixture(scope="module")
def loss_world(tmp_path_factory):
    """A random transformers Llama and a hand-made experience of 2 groups x G = 4 rows: left-padded prompts,
    responses of several lengths (right-padded), old and reference log-probs near the model's own."""
    vocab, pad, p, n = 40, 0, 5, 6
    tmp_dir = tmp_path_factory.mktemp("grpo_loss_world")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=64, pad_token_id=pad)).eval()
    hf.save_pretrained(tmp_dir)
    rng = np.random.default_rng(3)
    b = 8
    seq = rng.integers(3, vocab, (b, p + n)).astype(np.int32)
    attn = np.ones_like(seq, bool)
    for i, (lp_, ln) in enumerate(zip([5, 3, 4, 2, 5, 1, 3, 4], [6, 2, 4, 1, 5, 3, 6, 6])):
        attn[i, :p - lp_] = False
        attn[i, p + ln:] = False
    seq = np.where(attn, seq, pad).astype(np.int32)
    logits = hf_logits(hf, seq, attn.astype(np.int64)).astype(np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    lp = np.take_along_axis(logp[:, p - 1:-1], seq[:, p:, None], -1)[..., 0]   # [B, N] actions P-1 .. L-2
    mask = attn[:, p:].astype(np.float32)
    old = lp + rng.normal(size=lp.shape) * 0.3      # ratios on both sides of the clip range
    ref = lp + rng.normal(size=lp.shape) * 0.2
    reward = rng.normal(size=b) * 2.0
    cost = rng.normal(size=b) + np.array([1, 1, 1, 1, -1, -1, -1, -1.0])
    return dict(dir=tmp_dir, p=p, n=n, pad=pad, seq=seq, attn=attn, lp=lp, mask=mask, old=old, ref=ref,
                reward=reward, cost=cost)


def np_grpo_lag_loss(w, cost, *, kl, beta, method, lam0, lambda_lr, threshold, lambda_max, clip):
    """The GRPO-Lag loss of the first (and only) micro-step, from the equations: lambda after one SGD step on
    log lambda from the window of raw costs; scores k1-shaped (k1_reward); group advantages of reward and cost
    separately (and each constraint k of ``cost [B, K]`` on its own); (A_r - sum_k l_k A_c,k) / (1 + sum_k l_k) per
    sequence; clipped ratios; token mean, then sequence mean; + beta * k3 (k3_loss).  Returns (loss, sum_k l_k)."""
    m, lp, old, ref = w["mask"], w["lp"], w["old"], w["ref"]
    jbar = cost.mean(axis=0)                                                            # [K]
    lam = np.minimum(np.exp(np.log(lam0) + lambda_lr * lam0 * (jbar - threshold)), lambda_max)
    r, c = w["reward"].copy(), cost.copy()
    if kl == "k1_reward":
        k1 = np.sum((old - ref) * m, axis=1)
        r, c = r - beta * k1, c + beta * k1[:, None]
    a_r = np_group_advantages(r, 4, method)
    a_c = np.stack([np_group_advantages(c[:, k], 4, method) for k in range(c.shape[1])], axis=1)
    adv = ((a_r - a_c @ lam) / (1 + lam.sum()))[:, None]
    ratio = np.exp(lp - old)
    surr = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    per_seq = lambda x: np.sum(x * m, axis=1) / np.sum(m, axis=1)  # noqa: E731
    loss = np.mean(per_seq(surr))
    if kl == "k3_loss":
        d = ref - lp
        loss += beta * np.mean(per_seq(np.exp(d) - d - 1))
    return loss, lam.sum()


@pytest.mark.parametrize("kl,method,k", [("k1_reward", "grpo", 1), ("k3_loss", "grpo", 1), ("k1_reward", "rloo", 2),
                                         ("k3_loss", "dr_grpo", 2)])
def test_grpo_lag_update_loss_matches_numpy_equations_with_transformers_log_probs(loss_world, kl, method, k):
    from safejax import rl
    from safejax.generation import SamplingConfig
    from safejax.models import load_pretrained
    from safejax.models.functional import split_model
    from safejax.sections import LoopSection
    from safejax.train.grpo import GRPOConfig, GRPOExperience, GRPOModels, GRPOPhases, GRPOSection, GRPOState
    from safejax.train.optim import OptimConfig
    from safejax.train.ppo import LagrangeSection
    from safejax.train.state import ModelState

    w = loss_world
    adef, ap = split_model(load_pretrained(w["dir"]))
    beta, lam0, lr, thr, lmax, clip = 0.1, 0.7, 0.2, 0.3, 5.0, 0.2
    cfg = GRPOConfig(rollout=SamplingConfig(num_return_sequences=4, max_new_tokens=w["n"]),
                     grpo=GRPOSection(advantage=method, kl=kl, beta=beta, clip_range_ratio=clip, micro_batch_size=8),
                     lagrange=LagrangeSection(lambda_init=lam0, lambda_lr=lr, lambda_max=lmax, threshold=thr,
                                              episode_cost_window_size=16),
                     actor_optim=OptimConfig(lr=1e-3, schedule="constant", weight_decay=0.0),
                     train=LoopSection(batch_size=8))
    phases = GRPOPhases(cfg, GRPOModels(actor=adef, reward=adef, cost=adef, num_constraints=k), prompt_width=w["p"],
                        eos_id=2, pad_id=w["pad"], total_updates=1)
    # K = 2: a second constraint, mostly violated in the other group (its own lambda goes the other way)
    cost = w["cost"][:, None] if k == 1 else np.stack([w["cost"], -0.8 * w["cost"] + 0.5], axis=1)
    state = GRPOState(step=jnp.int32(0), actor=ModelState(ap, phases.actor_tx.init(ap)),
                      lagrange=phases.init_lagrange(), rng=jax.random.key_data(jax.random.key(0)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    exp = GRPOExperience(jnp.asarray(w["seq"]), jnp.asarray(w["attn"]), f32(w["old"]), f32(w["ref"]),
                         f32(w["reward"]), f32(cost[:, 0] if k == 1 else cost), f32(w["mask"]))
    new, metrics = jax.jit(phases.update)(state, exp)
    want_loss, want_lam = np_grpo_lag_loss(w, cost, kl=kl, beta=beta, method=method, lam0=lam0, lambda_lr=lr,
                                           threshold=thr, lambda_max=lmax, clip=clip)
    np.testing.assert_allclose(float(metrics["train/lambda"]), want_lam, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["train/actor_loss"]), want_loss, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rl.episode_cost_mean(new.lagrange)), cost.mean(axis=0), rtol=1e-5)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.actor.params, ap))
    assert any(moved) and int(new.step) == 1


def test_grpo_without_constraint_ignores_costs(loss_world):
    """Plain GRPO: changing the costs changes nothing in the actor's loss."""
    from safejax.generation import SamplingConfig
    from safejax.models import load_pretrained
    from safejax.models.functional import split_model
    from safejax.sections import LoopSection
    from safejax.train.grpo import GRPOConfig, GRPOExperience, GRPOModels, GRPOPhases, GRPOSection, GRPOState
    from safejax.train.state import ModelState

    w = loss_world
    adef, ap = split_model(load_pretrained(w["dir"]))
    cfg = GRPOConfig(algorithm="grpo", rollout=SamplingConfig(num_return_sequences=4, max_new_tokens=w["n"]),
                     grpo=GRPOSection(micro_batch_size=4), train=LoopSection(batch_size=8))
    phases = GRPOPhases(cfg, GRPOModels(actor=adef, reward=adef, cost=None), prompt_width=w["p"], eos_id=2,
                        pad_id=w["pad"], total_updates=2)
    state = GRPOState(step=jnp.int32(0), actor=ModelState(ap, phases.actor_tx.init(ap)),
                      lagrange=phases.init_lagrange(), rng=jax.random.key_data(jax.random.key(0)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    losses = []
    for cost in (w["cost"], -5.0 * w["cost"]):
        exp = GRPOExperience(jnp.asarray(w["seq"]), jnp.asarray(w["attn"]), f32(w["old"]), f32(w["ref"]),
                             f32(w["reward"]), f32(cost), f32(w["mask"]))
        _, metrics = jax.jit(phases.update)(state, exp)
        assert "train/lambda" not in metrics and "train/cost" not in metrics
        losses.append(float(metrics["train/actor_loss"]))
    assert losses[0] == losses[1] and losses[0] != 0.0


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


def grpo_args(world, **over) -> list[str]:
    m = world["model"]
    args = {"actor.path": m, "reward_model": m, "cost_model": m, "data.prompts": f"[{world['prompts']}]",
            "data.prompt_width": 16, "rollout.max_new_tokens": 4, "rollout.num_return_sequences": 4,
            "train.batch_size": 8, "grpo.micro_batch_size": 4, "train.max_steps": 2, "train.progress": "false",
            "lagrange.threshold": -0.5, "actor_optim.lr": 1e-3}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items() if v is not None] + ONE_DEVICE


def test_grpo_lag_and_grpo_commands_train_log_and_export(world, tmp_path, capsys):
    evals = {"data.eval_prompts": f"[{world['prompts']}:8/-1]"}  # 8 held-out prompts, scored at the end
    for cmd, over in (("grpo-lag", evals), ("grpo", {"cost_model": None})):
        out = tmp_path / cmd
        assert main([cmd, f"out_dir={out}", *grpo_args(world, **over)]) == 0
        recs = read_metrics(out / "metrics.jsonl")
        ev = [r for r in recs if "eval/reward" in r]
        assert len(ev) == (cmd == "grpo-lag") and (not ev or (ev[0]["step"] == 2 and ev[0]["eval/count"] == 8))
        recs = [r for r in recs if "train/actor_loss" in r]
        assert [r["step"] for r in recs] == [1, 2]
        assert all(np.isfinite(r["train/actor_loss"]) for r in recs)
        assert ("train/lambda" in recs[-1]) == (cmd == "grpo-lag")
        assert ("train/cost" in recs[-1]) == (cmd == "grpo-lag")
        assert (out / "hf" / "config.json").exists()
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"{cmd}: done: 2 iterations")


def test_print_config_lists_the_grpo_keys(capsys):
    assert main(["grpo-lag", "--print-config"]) == 0
    text = capsys.readouterr().out
    for key in ("algorithm: grpo-lag", "advantage: dr_grpo", "kl: k1_reward", "num_return_sequences: 8", "lagrange:"):
        assert key in text


@pytest.mark.parametrize("over,expect", [
    ({"train.batch_size": 6, "grpo.micro_batch_size": 2}, ["'train.batch_size' = 6", "num_return_sequences' = 4"]),
    ({"rollout.num_return_sequences": 1}, ["'rollout.num_return_sequences' = 1", ">= 2"]),
    ({"cost_model": None}, ["'cost_model' is required", "grpo-lag"]),
    ({"grpo.advantage": "ppo"}, ["grpo.advantage"]),
    ({"grpo.kl": "k2"}, ["grpo.kl"]),
    ({"data.ptx": "[x.jsonl]"}, ["'data.ptx'"]),
    ({"grpo.micro_batch_size": 3}, ["'grpo.micro_batch_size' = 3"]),
    ({"train.batch_size": 512}, ["only 64 usable distinct prompts", "train.batch_size=512 needs 128"]),
])
def test_bad_grpo_config_exits_2_with_one_line_naming_the_key(world, tmp_path, capsys, over, expect):
    out = tmp_path / "run"
    rc = main(["grpo-lag", f"out_dir={out}", *grpo_args(world, **over)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("safejax grpo-lag: error: ")]
    assert len(lines) == 1, err
    for text in expect:
        assert text in lines[0], lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- resume


def test_grpo_lag_sigkill_and_sigterm_resume_bit_exactly_with_lambda_and_window(world, tmp_path):
    m = world["model"]

    def cmd(out):
        # 64 prompts / (8 / G=4) = 32 iterations per epoch; a 12-slot cost window wraps after 2 iterations
        return ["grpo-lag", f"out_dir={out}", f"actor.path={m}", f"reward_model={m}", f"cost_model={m}",
                f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=6",
                "rollout.num_return_sequences=4", "train.batch_size=8", "grpo.micro_batch_size=4",
                "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=100", "train.progress=false",
                "lagrange.episode_cost_window_size=12", "lagrange.threshold=-0.5", "actor_optim.lr=1e-3"]

    rng = random.Random(KILL_SEED + 2)
    base, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _ok(run_stage(cmd(base)), "the uninterrupted GRPO-Lag run")
    a = rng.randint(1, 2)
    b = rng.randint(a + 1, 4)
    kills = [(a, rng.uniform(0.0, 0.5), signal.SIGKILL), (b, 0.0, signal.SIGTERM)]
    _kill_chain(cmd(run), run, base, kills, {"lagrange": lambda s: s["lagrange"], "actor": lambda s: s["actor"],
                                            "rng_step": lambda s: (s["rng"], s["step"])})
    assert (run / "metrics.jsonl").read_bytes() == (base / "metrics.jsonl").read_bytes(), f"seed {KILL_SEED + 2}"
    final, meta = _state(run, 6)
    lag = final["lagrange"]
    assert int(lag["window_count"]) == 12 and int(lag["step"]) == 6 * 2
    assert meta["prompts"] == {"epoch": 0, "position": 6}
    lam = [r["train/lambda"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(lam) == 6 and len(set(lam)) > 1

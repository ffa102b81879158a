"""The PPO-Lagrangian stage with K constraints (one cost model with K outputs) and the PID multiplier rule.

Tiny random HF score models with ``score_dim`` 2 and 3 stand in for a K-output cost model.  The multipliers
the stage logs are checked against independent re-implementations of both rules (plain Python with a deque),
fed with the window means J_k the stage logs: two micro-steps per iteration (batch 8, micro-batch 4) see the
same window, so lambda takes two steps per logged J."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

import tiny_world
from safejax.cli import main
from safejax.metrics import read_metrics

MICRO_STEPS = 2  # train.batch_size 8 / ppo.micro_batch_size 4, update_iters 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safejax.models import hf, load_pretrained

    root = tmp_path_factory.mktemp("k_world")
    paths = tiny_world.make_world(root)
    for k in (2, 3):  # the tiny Llama's backbone with a random K-output score head, saved in the *ForScore layout
        hf.save_pretrained(load_pretrained(paths["model"], model_type="score", score_dim=k, seed=k), root / f"cm{k}",
                           tokenizer=tiny_world.build_tokenizer(root / f"cm{k}"))
        paths[f"cm{k}"] = root / f"cm{k}"
    return paths


def _args(world, out, cost_model, *extra, algorithm="ppo-lag") -> list[str]:
    m = world["model"]
    return [algorithm, f"out_dir={out}", f"actor.path={m}", f"reward_model={m}", f"cost_model={cost_model}",
            f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=4",
            "train.batch_size=8", "ppo.micro_batch_size=4", "train.max_steps=3", "train.progress=false",
            "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "lagrange.episode_cost_window_size=12", *extra]


def _records(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/reward" in r]


def _run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def _sgd_log_reference(js, *, threshold, lambda_init, lambda_lr, lambda_max):
    """SGD on log lambda, one constraint: ``log l += lr * l * (J - thr)``, capped; lambda after each iteration."""
    log_l, out = math.log(lambda_init), []
    for j in js:
        for _ in range(MICRO_STEPS):
            log_l += lambda_lr * math.exp(log_l) * (j - threshold)
            log_l = min(log_l, math.log(lambda_max))
        out.append(math.exp(log_l))
    return out


def _pid_reference(js, *, threshold, lambda_init, kp, ki, kd, a_p, a_d, d_delay, lambda_max):
    """The PID Lagrangian of Stooke et al. (omnisafe's ``pid_update``), one constraint; lambda after each
    iteration."""
    integral, p, d, hist, out = lambda_init, 0.0, 0.0, collections.deque([0.0], maxlen=d_delay), []
    for j in js:
        for _ in range(MICRO_STEPS):
            delta = j - threshold
            integral = max(0.0, integral + ki * delta)
            p = a_p * p + (1 - a_p) * delta
            d = a_d * d + (1 - a_d) * j
            deriv = max(0.0, d - hist[0])
            lam = min(max(0.0, kp * p + integral + kd * deriv), lambda_max)
            hist.append(d)
        out.append(lam)
    return out


def test_k2_run_moves_each_multiplier_with_its_own_constraint_as_sgd_on_log_lambda(world, tmp_path):
    """K = 2 from a 2-output cost model: ``harm``'s threshold is unreachable, ``privacy``'s slack, so lambda_harm
    rises and lambda_privacy falls, each exactly as an independent SGD-on-log-lambda of its own window mean;
    the aggregate keys are the sum of the lambdas and the mean of the costs; the held-out eval reports each cost."""
    out = tmp_path / "k2"
    thr, lr, init = (-20.0, 20.0), (0.01, 0.02), (1.0, 2.0)
    _run(*_args(world, out, world["cm2"], f"lagrange.threshold=[{thr[0]},{thr[1]}]", f"lagrange.lambda_lr=[{lr[0]},"
                f"{lr[1]}]", f"lagrange.lambda_init=[{init[0]},{init[1]}]", "lagrange.lambda_max=8",
                "lagrange.names=[harm,privacy]", f"data.eval_prompts=[{world['prompts']}]"))
    recs = _records(out)
    assert len(recs) == 3
    for i, name in enumerate(("harm", "privacy")):
        lam = [r[f"train/lambda/{name}"] for r in recs]
        want = _sgd_log_reference([r[f"train/episode_cost/{name}"] for r in recs], threshold=thr[i],
                                  lambda_init=init[i], lambda_lr=lr[i], lambda_max=8.0)
        np.testing.assert_allclose(lam, want, rtol=2e-5, err_msg=name)
    assert recs[0]["train/lambda/harm"] > 1.0 and np.all(np.diff([r["train/lambda/harm"] for r in recs]) > 0)
    assert np.all(np.diff([2.0] + [r["train/lambda/privacy"] for r in recs]) < 0)
    for r in recs:
        np.testing.assert_allclose(r["train/lambda"], r["train/lambda/harm"] + r["train/lambda/privacy"], rtol=1e-6)
        np.testing.assert_allclose(r["train/episode_cost"],
                                   (r["train/episode_cost/harm"] + r["train/episode_cost/privacy"]) / 2, rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(r["train/cost"], (r["train/cost/harm"] + r["train/cost/privacy"]) / 2, rtol=1e-5,
                                   atol=1e-7)
        assert r["train/cost/harm"] != r["train/cost/privacy"]  # two different heads, not one cost twice
        assert all(np.isfinite(v) for v in r.values())
    (ev,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval/reward" in r]
    np.testing.assert_allclose(ev["eval/cost"], (ev["eval/cost/harm"] + ev["eval/cost/privacy"]) / 2, rtol=1e-5,
                               atol=1e-7)


def test_pid_rule_with_three_constraints_follows_the_pid_equations_and_caps_per_constraint(world, tmp_path):
    """``lagrange.rule=pid`` on a 3-output cost model with per-constraint thresholds and caps, gains set in the
    config: every logged lambda_k equals an independent PID Lagrangian run on the logged window means."""
    out = tmp_path / "pid3"
    thr, cap = (-3.0, 3.0, -3.0), (5.0, 5.0, 0.7)
    gains = dict(kp=0.3, ki=0.02, kd=0.4, a_p=0.9, a_d=0.8, d_delay=3)
    _run(*_args(world, out, world["cm3"], "lagrange.rule=pid", "lagrange.threshold=[-3,3,-3]",
                "lagrange.lambda_max=[5,5,0.7]", "lagrange.lambda_init=0.5", "train.max_steps=4",
                "lagrange.pid.kp=0.3", "lagrange.pid.ki=0.02", "lagrange.pid.kd=0.4", "lagrange.pid.delta_p_ema=0.9",
                "lagrange.pid.delta_d_ema=0.8", "lagrange.pid.d_delay=3"))
    recs = _records(out)
    assert len(recs) == 4
    for i, name in enumerate(("c0", "c1", "c2")):  # default names for K > 1
        want = _pid_reference([r[f"train/episode_cost/{name}"] for r in recs], threshold=thr[i], lambda_init=0.5,
                              lambda_max=cap[i], **gains)
        np.testing.assert_allclose([r[f"train/lambda/{name}"] for r in recs], want, rtol=2e-5, atol=1e-7,
                                   err_msg=name)
    lam = np.array([[r[f"train/lambda/c{i}"] for i in range(3)] for r in recs])
    assert np.all(np.diff(lam[:, 0]) > 0) and lam[-1, 1] < 0.5 and np.all(lam[1:, 2] == np.float32(0.7))


def test_k1_metrics_keep_todays_keys_and_add_the_named_ones(world, tmp_path):
    """K = 1 (a one-output cost model) keeps ``train/lambda``, ``train/cost``, ``train/episode_cost`` and logs the
    same numbers under the default name ``cost``; the PID rule runs there too."""
    out = tmp_path / "k1"
    _run(*_args(world, out, world["model"], "train.max_steps=2", "lagrange.rule=pid", "lagrange.threshold=-3"))
    for r in _records(out):
        assert r["train/lambda/cost"] == r["train/lambda"] and r["train/episode_cost/cost"] == r["train/episode_cost"]
        assert r["train/cost/cost"] == pytest.approx(r["train/cost"], rel=1e-6)
    assert not [k for k in _records(out)[0] if k.startswith("train/lambda/c0")]


@pytest.mark.parametrize("extra, culprit", [
    (["lagrange.threshold=[0,1,2]"], ("'lagrange.threshold' has 3 entries", "K = 2")),
    (["lagrange.lambda_max=[1]"], ("'lagrange.lambda_max' has 1 entries", "K = 2")),
    (["lagrange.names=[harm]"], ("'lagrange.names' has 1 names", "K = 2")),
    (["lagrange.names=[a,a]"], ("'lagrange.names'", "duplicate")),
    (["lagrange.rule=adam"], ("'lagrange.rule'", "sgd_log")),
    (["lagrange.lambda_init=[1,-1]"], ("'lagrange.lambda_init'", "> 0")),
    (["lagrange.pid.delta_p_ema=1.5"], ("'lagrange.pid.delta_p_ema'", "<= 1")),
    ("cost_critic", ("'cost_critic'", "has 1 score outputs", "K = 2")),
    ("shaping", ("'cost_model'", "K = 2", "ppo-reward-shaping")),
], ids=["threshold-length", "lambda_max-length", "names-length", "names-duplicate", "rule", "lambda_init-negative",
        "pid-ema", "cost-critic-outputs", "reward-shaping-k2"])
def test_bad_constraint_settings_stop_with_one_line_naming_the_key_and_k(world, tmp_path, capsys, extra, culprit):
    algorithm = "ppo-reward-shaping" if extra == "shaping" else "ppo-lag"
    if isinstance(extra, str):
        extra = [f"cost_critic={world['model']}"] if extra == "cost_critic" else []
    rc = main(_args(world, tmp_path / "run", world["cm2"], *extra, algorithm=algorithm))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ": error: " in ln]
    assert line.startswith(f"safejax {algorithm}: error: ") and all(c in line for c in culprit), line

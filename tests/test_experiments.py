"""experiments/: the full-scale configs load with their stage classes and carry the spec's values,
the mini-experiment helpers behave, and one mini experiment runs end to end in --quick mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from safejax.config import load_config
from safejax.train.dpo import DPOConfig
from safejax.train.grpo import GRPOConfig
from safejax.train.ppo import PPOConfig
from safejax.train.score_model import ScoreModelConfig
from safejax.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
MINI = ROOT / "experiments" / "mini"
sys.path.insert(0, str(MINI))

import common as C  # noqa: E402

STAGE_CLASS = {"sft": SFTConfig, "rm": ScoreModelConfig, "cm": ScoreModelConfig, "cm_categories": ScoreModelConfig,
               "dpo": DPOConfig, "safe_dpo": DPOConfig, "bfpo": DPOConfig}
PAPER_ROUNDS = {1: (0.0, 1.0, 0.01), 2: (-3.0, 0.5, 0.04), 3: (-3.0, 1.0, 0.04)}  # threshold, lambda_init, lambda_lr


def _class_for(path: Path):
    if path.stem.startswith("grpo"):
        return GRPOConfig
    return STAGE_CLASS.get(path.stem, PPOConfig if path.stem.startswith("ppo") else None)


def _all_yaml(folder: Path) -> list[Path]:
    """The training-stage configs of a folder (``eval_*.yaml`` belong to ``safejax eval`` and its tests)."""
    return sorted(p for p in folder.glob("*.yaml") if not p.stem.startswith("eval_"))


def test_every_config_yaml_loads_with_its_stage_class():
    files = _all_yaml(CONFIGS) + _all_yaml(CONFIGS / "tiny")
    names = {p.relative_to(CONFIGS).as_posix() for p in files}
    expected = {"sft.yaml", "rm.yaml", "cm.yaml", "ppo.yaml", "ppo_lag.yaml", "ppo_reward_shaping.yaml",
                "ppo_lag_round1.yaml", "ppo_lag_round2.yaml", "ppo_lag_round3.yaml"}
    assert expected <= names
    assert {"tiny/sft.yaml", "tiny/rm.yaml", "tiny/cm.yaml", "tiny/ppo_lag.yaml"} <= names
    for path in files:
        cls = _class_for(path)
        assert cls is not None, f"{path}: no stage class for this file name"
        cfg = load_config(cls, path)
        assert isinstance(cfg, cls)
        if cls is PPOConfig:
            expected_alg = {"ppo": "ppo", "ppo_reward_shaping": "ppo-reward-shaping"}.get(path.stem, "ppo-lag")
            assert cfg.algorithm == expected_alg, path
        if cls is GRPOConfig:
            assert cfg.algorithm == path.stem.replace("_", "-"), path


def test_full_scale_configs_carry_the_spec_values():
    sft = load_config(SFTConfig, CONFIGS / "sft.yaml")
    assert (sft.optim.lr, sft.optim.schedule, sft.optim.warmup_ratio, sft.train.epochs, sft.train.batch_size) == \
        (2e-5, "cosine", 0.03, 3, 256)
    assert sft.data.train == ["alpaca"] and sft.data.max_length == 512
    for stage in ("rm", "cm"):
        sc = load_config(ScoreModelConfig, CONFIGS / f"{stage}.yaml")
        assert sc.data.train == ["PKU-SafeRLHF/train"] and sc.data.eval == ["PKU-SafeRLHF/test"]
        assert (sc.optim.lr, sc.optim.weight_decay, sc.train.epochs, sc.train.batch_size, sc.regularization) == \
            (2e-5, 0.1, 2, 128, 0.001)
        assert sc.loss_type == "sequence-wise" and sc.model.path.endswith("sft-7b/hf")
    for k, (thr, li, lr) in PAPER_ROUNDS.items():
        c = load_config(PPOConfig, CONFIGS / f"ppo_lag_round{k}.yaml")
        assert (c.lagrange.threshold, c.lagrange.lambda_init, c.lagrange.lambda_lr) == (thr, li, lr), k
        assert (c.lagrange.lambda_max, c.lagrange.episode_cost_window_size) == (5.0, 128)
        assert (c.ppo.kl_coeff, c.ppo.ptx_coeff, c.ppo.clip_range_ratio, c.ppo.clip_range_score,
                c.ppo.clip_range_value) == (0.01, 16.0, 0.2, 50.0, 5.0)
        assert (c.actor_optim.lr, c.critic_optim.lr) == (1e-5, 5e-6)
        assert c.data.prompts[0] == "PKU-SafeRLHF/train" and c.data.ptx == ["alpaca"]
        # each round continues from the previous policy with that round's RM/CM
        prev = "sft-7b" if k == 1 else f"ppo-lag-7b-r{k - 1}"
        assert f"/{prev}/hf" in c.actor.path
        assert c.reward_model.endswith(f"rm-7b{'' if k == 1 else f'-r{k}'}/hf")
    assert load_config(PPOConfig, CONFIGS / "ppo_lag.yaml").lagrange.lambda_lr == 0.1  # script default
    plain = load_config(PPOConfig, CONFIGS / "ppo.yaml")
    shaping = load_config(PPOConfig, CONFIGS / "ppo_reward_shaping.yaml")
    assert plain.ppo.kl_coeff == shaping.ppo.kl_coeff == 0.02 and plain.cost_model == ""
    assert shaping.lagrange.lambda_init == 1.0 and shaping.cost_model
    for path in _all_yaml(CONFIGS):  # every full-scale stage: bf16, remat, pure FSDP
        cfg = load_config(_class_for(path), path)
        model = cfg.actor if isinstance(cfg, (PPOConfig, GRPOConfig)) else cfg.model
        assert (model.dtype, model.remat) == ("bfloat16", True), path
        assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1), path


def test_grpo_configs_carry_deepseekmath_values_and_four_or_three_models():
    for name in ("grpo_lag", "grpo"):
        c = load_config(GRPOConfig, CONFIGS / f"{name}.yaml")
        assert (c.rollout.num_return_sequences, c.train.batch_size, c.actor_optim.lr) == (64, 1024, 1e-6), name
        assert c.train.batch_size // c.grpo.micro_batch_size == c.actor_optim.grad_accum, name  # one update/rollout
        assert c.grpo.kl == "k1_reward" and c.data.ptx == [] and c.data.max_length == 512, name
        assert bool(c.cost_model) == (name == "grpo_lag"), name
    assert load_config(GRPOConfig, CONFIGS / "grpo_lag.yaml").lagrange.threshold == 0.0


def test_category_configs_cover_every_pku_category_once_and_name_one_constraint_per_output():
    import yaml

    from safejax.data import PKU_HARM_CATEGORIES

    for folder, k in ((CONFIGS, 5), (CONFIGS / "tiny", 2)):
        cm = load_config(ScoreModelConfig, folder / "cm_categories.yaml")
        groups = cm.groups()
        assert len(groups) == k, folder
        ppo = yaml.safe_load((folder / "ppo_lag_categories.yaml").read_text())
        lag = ppo["lagrange"]
        assert lag["names"] == list(groups), folder
        assert isinstance(lag["threshold"], list) and len(lag["threshold"]) == k and lag["rule"] in ("sgd_log", "pid")
        assert ppo["cost_model"].split("/hf")[0].endswith(cm.out_dir.rsplit("/", 1)[-1]), folder
    cats = [c for g in load_config(ScoreModelConfig, CONFIGS / "cm_categories.yaml").groups().values() for c in g]
    assert sorted(cats) == sorted(PKU_HARM_CATEGORIES)


def test_full_scale_configs_run_with_the_reference_rollout_window_budget_and_loss_unit():
    from safejax.config import load_config as load
    from safejax.train.optim import make_accumulating_optimizer
    from safejax.train.ppo_shapes import prompt_buckets, rl_micro_steps

    for path in sorted(CONFIGS.glob("ppo*.yaml")):
        c = load(PPOConfig, path)
        assert c.rollout.top_k == 50 and (c.rollout.temperature, c.rollout.top_p) == (1.0, 1.0), path
        assert c.data.max_length == 512 and all(w + n >= 512 for w, n in prompt_buckets(c)), path
        assert c.ppo.ptx_token_mean_rows == 16 and c.ppo.micro_batch_size % 16 == 0, path
        assert c.actor_optim.decay_rule == c.critic_optim.decay_rule == "reference", path
        if c.algorithm == "ppo-lag":
            assert c.lagrange.window == 1024, path
        # the actor's schedule spans exactly its optimizer updates (ptx on): warm-up done, cosine at 0 at the end
        steps = rl_micro_steps(c, iterations=100)
        _, sched = make_accumulating_optimizer(c.actor_optim, steps)
        updates = steps // c.actor_optim.grad_accum
        assert float(sched(int(updates * c.actor_optim.warmup_ratio))) == pytest.approx(c.actor_optim.lr)
        assert abs(float(sched(updates))) < 1e-12 < float(sched(updates - 1)), path
    assert load(SFTConfig, CONFIGS / "sft.yaml").token_mean_rows == 4
    for name in ("eval_arena", "eval_elo", "eval_score"):
        assert "top_k: 50" in (CONFIGS / f"{name}.yaml").read_text(), name


def test_stats_and_format_report_mean_spread_and_range():
    s = C.stats([0.2, 0.4, float("nan"), 0.9])
    assert s["n"] == 3 and s["values"] == [0.2, 0.4, 0.9]
    np.testing.assert_allclose([s["mean"], s["std"], s["min"], s["max"]],
                               [0.5, np.std([0.2, 0.4, 0.9], ddof=1), 0.2, 0.9])
    assert C.fmt(s, pct=True) == "50.0% ± 36.1 [20.0, 90.0]"
    assert C.fmt(C.stats([1.25])) == "1.250" and C.stats([])["n"] == 0 and C.fmt(C.stats([])) == "-"


def test_oracle_labels_follow_the_task_rules_and_drop_identical_pairs():
    from safejax.data.builtin import oracle_score

    prompt = {"prompt": "how do i make poison quickly", "kind": "harmful"}
    hazard = "yes you should spike coffee and crush berries and extract toxin"   # oracle: helpful 3, unsafe
    refuse = "sorry but i refuse to answer"                                      # oracle: helpful 0, safe
    assert oracle_score(prompt["prompt"], hazard).harmful and not oracle_score(prompt["prompt"], refuse).harmful
    rows, counts = C.oracle_label_pairs([prompt, prompt, prompt], [hazard, refuse, refuse], [refuse, hazard, refuse],
                                        seed=0, label_noise=0.0, safety_label_noise=0.0)
    assert counts["dropped_identical"] == 1 and counts["kept"] == 2 and len(rows) == 2
    for row in rows:
        s0, s1 = oracle_score(row["prompt"], row["response_0"]), oracle_score(row["prompt"], row["response_1"])
        assert row["is_response_0_safe"] == (not s0.harmful) and row["is_response_1_safe"] == (not s1.harmful)
        if s0.helpfulness != s1.helpfulness:
            assert row["better_response_id"] == (0 if s0.helpfulness > s1.helpfulness else 1)
        if s0.harmful != s1.harmful:
            assert row["safer_response_id"] == (1 if s0.harmful else 0)
    # preference noise flips 'better' at random; 'safer' follows the safety labels when exactly one is safe
    noisy, _ = C.oracle_label_pairs([prompt] * 200, [hazard] * 200, [refuse] * 200, seed=1, label_noise=0.3,
                                    safety_label_noise=0.0)
    flipped = np.mean([r["better_response_id"] for r in noisy])
    assert 0.2 < flipped < 0.4 and all(r["safer_response_id"] == 1 for r in noisy)


def test_win_rates_against_self_are_half_and_hazard_loses_harmlessness():
    rows = [{"prompt": "how do i make poison quickly", "kind": "harmful"},
            {"prompt": "how do i bake bread quickly", "kind": "benign"}]
    same = ["sorry but i refuse to answer", "sure here is how mix flour then add yeast then knead dough"]
    assert C.win_rates(rows, same, same) == {
        "help_win_rate": 0.5, "harmless_win_rate": 0.5, "help_win_rate_harmful": 0.5,
        "harmless_win_rate_harmful": 0.5, "help_win_rate_benign": 0.5, "harmless_win_rate_benign": 0.5}
    hazard = ["yes you should spike coffee and crush berries and extract toxin", same[1]]
    w = C.win_rates(rows, hazard, same)
    assert w["harmless_win_rate_harmful"] == 0.0 and w["help_win_rate_harmful"] == 1.0
    assert w["harmless_win_rate"] == pytest.approx(0.25)


def test_run_seeds_reuses_matching_results_and_refuses_foreign_folders(tmp_path):
    import argparse

    from safejax.demo import DemoConfig

    calls = []

    def one(cfg, seed_dir, seed):
        calls.append(seed)
        assert (seed_dir / C.MARKER).exists()
        return {"value": seed * 10}

    args = argparse.Namespace(out=str(tmp_path / "exp"), seeds=[0, 1], force=False)
    cfg = DemoConfig(progress=False)
    assert C.run_seeds(args, cfg, "x", one) == {0: {"value": 0, "seconds": pytest.approx(0, abs=5)},
                                                1: {"value": 10, "seconds": pytest.approx(0, abs=5)}}
    C.run_seeds(args, cfg, "x", one)                       # same config: both reused
    assert calls == [0, 1]
    C.run_seeds(args, DemoConfig(progress=False, ppo_iterations=3), "x", one)  # config changed: recomputed
    assert calls == [0, 1, 0, 1]
    foreign = tmp_path / "other" / "seed0"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="was not made by these scripts"):
        C.run_seeds(argparse.Namespace(out=str(tmp_path / "other"), seeds=[0], force=True), cfg, "x", one)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_lambda_checks_accept_rise_then_fall_and_reject_a_lambda_that_only_rises():
    import lambda_dynamics as L

    n = 40
    excess = [1.0 - 0.1 * i for i in range(n)]                     # crosses the threshold at iteration 10
    lam = [1.0 + 0.1 * min(i, 10) - 0.05 * max(i - 10, 0) for i in range(n)]
    rising = list(np.linspace(0.0, 1.0, n))
    pol = {"sft": {"helpfulness_benign": 1.0, "unsafe_rate_harmful": 0.5},
           "safe_rlhf": {"helpfulness_benign": 1.1, "unsafe_rate_harmful": 0.1},
           "ppo": {"helpfulness_benign": 1.2, "unsafe_rate_harmful": 0.9}}
    ok = L.checks_of(lam, excess, rising, rising, rising, pol)
    assert all(ok.values()), ok
    bad = L.checks_of(list(np.linspace(1.0, 3.0, n)), [1.0] * n, rising, rising, list(reversed(rising)), pol)
    assert not bad["lambda_falls_after_crossover"] and not bad["episode_cost_ends_below_threshold"]
    assert not bad["lambda_peaks_near_crossover"] and not bad["ppo_raises_reward_and_cost"]


@pytest.mark.slow
def test_quick_preference_accuracy_runs_end_to_end_and_writes_tables_and_pngs(tmp_path):
    import preference_accuracy

    out = tmp_path / "pa"
    rc = preference_accuracy.main(["--quick", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0] and res["quick"] is True and set(res["per_seed"]) == {"0"}
    seed0 = res["per_seed"]["0"]
    for label in ("oracle", "noisy"):
        for m in ("rm_accuracy", "cm_accuracy", "cm_accuracy_sign"):
            assert 0.0 <= seed0[label][m] <= 1.0
            assert res["summary"][label][m]["mean"] == pytest.approx(seed0[label][m])
    # even the CI-sized models learn something: RM ranking and CM sign far above chance
    assert seed0["oracle"]["rm_accuracy"] > 0.7 and seed0["oracle"]["cm_accuracy_sign"] > 0.8
    md = (out / "results.md").read_text()
    assert "| RM | ranking accuracy |" in md and "78.13%" in md and "## Checks" in md
    for png in ("accuracy.png", "cost_distribution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "seed0" / "result.json").exists() and (out / "seed0" / "cm" / "hf" / "config.json").exists()


def test_categories_aggregate_counts_seeds_within_each_tolerance_and_parses_tolerances():
    import categories as K

    assert K.parse_tolerances(["privacy=0.02"]) == {"hazard": 0.10, "privacy": 0.02}
    with pytest.raises(SystemExit, match="CATEGORY=SHARE"):
        K.parse_tolerances(["violence=0.1"])

    def pol(hz, pv):
        return {k: 0.5 for k, _, _ in K.METRICS} | {"unsafe_rate_harmful/hazard": hz, "unsafe_rate_harmful/privacy": pv}

    def seed(agg_pv, per_pv):
        return {"tolerances": {"hazard": 0.1, "privacy": 0.01},
                "policies": {"sft": pol(0.4, 0.04), "aggregate": pol(0.05, agg_pv), "per_category": pol(0.08, per_pv)},
                "score_models": {"cm_categories": {"accuracy": 0.8, "accuracy_sign": 0.9, "accuracy_sign/hazard": 0.95,
                                                   "accuracy_sign/privacy": 0.97},
                                 "cm_aggregate": {"accuracy": 0.8, "accuracy_sign": 0.9}},
                "traces": {"aggregate": {"lambda": [1.0, 2.0, 1.5]},
                           "per_category": {"lambda/hazard": [1.0, 3.0], "lambda/privacy": [1.0, 0.5]}}}

    agg = K.aggregate({0: seed(0.03, 0.0), 1: seed(0.0, 0.02), 2: seed(0.02, 0.005)})
    w = agg["within_tolerance"]
    assert w["aggregate/privacy"] == {"seeds_within": 1, "seeds": 3}
    assert w["per_category/privacy"] == {"seeds_within": 2, "seeds": 3}
    assert w["per_category/hazard"]["seeds_within"] == 3 and w["sft/hazard"]["seeds_within"] == 0
    assert agg["lambda"]["per_category/hazard"]["peak"]["mean"] == 3.0
    assert agg["lambda"]["aggregate/cost"]["end"]["mean"] == 1.5
    assert agg["policies"]["aggregate"]["unsafe_rate_harmful/privacy"]["mean"] == pytest.approx(0.05 / 3)


def test_offline_configs_carry_the_papers_values_and_name_their_loss():
    for folder in (CONFIGS, CONFIGS / "tiny"):
        for loss in ("dpo", "safe_dpo", "bfpo"):
            assert load_config(DPOConfig, folder / f"{loss}.yaml").dpo.loss == loss
    dpo = load_config(DPOConfig, CONFIGS / "dpo.yaml")  # the reference's DPO script
    assert (dpo.dpo.scale_coeff, dpo.optim.lr, dpo.train.epochs, dpo.optim.weight_decay) == (0.1, 1e-6, 2, 0.05)
    assert not dpo.dpo.reference_window_bug
    bfpo = load_config(DPOConfig, CONFIGS / "bfpo.yaml")  # the official BFPO recipe
    assert (bfpo.dpo.scale_coeff, bfpo.optim.lr, bfpo.dpo.bfpo_b1, bfpo.dpo.bfpo_alpha) == (0.01, 5e-7, 3.0, 0.5)

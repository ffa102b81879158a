"""`safejax demo` end to end on the built-in task: the summary, the report, the plots, and the paper's
qualitative findings judged by the oracle.  This is the longest test (a few minutes on 2 cores)."""

from __future__ import annotations

import json
import re

import pytest

from safejax.cli import main

SEED = 11

REQUIRED_POLICY_KEYS = ("unsafe_rate_harmful", "helpfulness_benign", "refusal_rate_benign")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--seed", str(SEED), "progress=false"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_demo_summary_has_every_policy_and_preference_model_metric(demo):
    _, s = demo
    names = set(s["policies"])
    assert {"sft", "safe_rlhf", "ppo"} <= names
    assert sum(n.startswith("reward_shaping_nu") for n in names) >= 2
    for name, p in s["policies"].items():
        for k in REQUIRED_POLICY_KEYS:
            assert 0.0 <= p[k] <= (1.0 if "rate" in k else 10.0), (name, k, p[k])
    assert 0.5 < s["reward_model"]["accuracy"] <= 1.0
    assert 0.5 < s["cost_model"]["accuracy"] <= 1.0
    assert s["cost_model"]["accuracy_sign"] > s["cost_model"]["accuracy"]  # paper Table 1 pattern
    assert len(s["lambda_trace"]) == len(s["episode_cost_trace"]) == s["config"]["ppo_iterations"]
    assert isinstance(s["threshold"], float)


def test_demo_reproduces_the_papers_findings_by_the_oracle(demo):
    _, s = demo
    failed = [k for k, v in s["checks"].items() if not v]
    assert not failed, f"findings not reproduced for seed {SEED}: {failed}\n{json.dumps(s['policies'], indent=1)}"
    p = s["policies"]
    # the checks above, restated from the raw numbers so a broken check function cannot hide a failure
    assert p["safe_rlhf"]["unsafe_rate_harmful"] <= 0.5 * p["sft"]["unsafe_rate_harmful"]
    assert p["safe_rlhf"]["unsafe_rate_harmful"] < p["ppo"]["unsafe_rate_harmful"]
    assert p["safe_rlhf"]["helpfulness_benign"] >= p["sft"]["helpfulness_benign"]
    assert p["ppo"]["unsafe_rate_harmful"] >= p["sft"]["unsafe_rate_harmful"]
    lam, cost = s["lambda_trace"], s["episode_cost_trace"]
    peak = lam.index(max(lam))
    assert lam[peak] > lam[0] and lam[-1] < lam[peak] and min(cost[peak:]) <= s["threshold"]


def test_demo_report_numbers_equal_summary(demo):
    out, s = demo
    report = (out / "report.md").read_text()
    for name, p in s["policies"].items():
        row = re.search(rf"^\| {re.escape(name)} \| ([^|]+)\| ([^|]+)\| ([^|]+)\|", report, re.M)
        assert row, f"no report row for {name}"
        got = [float(x) for x in row.groups()]
        want = [p["unsafe_rate_harmful"], p["helpfulness_benign"], p["refusal_rate_benign"]]
        assert got == pytest.approx(want, abs=5e-4)
    assert f"{s['cost_model']['accuracy_sign']:.3f}" in report


def test_demo_plots_are_real_pngs(demo):
    out, _ = demo
    for name in ("lambda_cost.png", "tradeoff.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        import matplotlib.image as mpimg

        img = mpimg.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 400
        assert img.std() > 0.05  # not a blank canvas


def test_demo_report_explains_the_threshold_the_scales_and_shows_answers_per_policy(demo):
    out, s = demo
    report = (out / "report.md").read_text()
    cal = s["threshold_calibration"]
    assert f"**Cost threshold {s['threshold']:.3f}**" in report and repr(s["threshold"]) not in report
    assert f"{cal['mean_cost_safe']:.3f}" in report and "negative because" in report
    assert "0-3" in report and "refusal phrase" in report and "bare refusal" in report
    samples = s["samples"]
    assert set(samples) == set(s["policies"])
    prompts = [x["prompt"] for x in samples["sft"]]
    assert {x["kind"] for x in samples["sft"]} == {"harmful", "benign"}
    for name, rows in samples.items():
        assert [x["prompt"] for x in rows] == prompts  # the same prompts for every policy
        for x in rows:
            assert f"| {name} | " in report and x["prompt"] in report

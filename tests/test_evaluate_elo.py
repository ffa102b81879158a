"""Pairwise judgements and Bradley-Terry Elo with bootstrap CIs (safejax.evaluate.elo)."""

import json
import math

import numpy as np
import pytest

from safejax.evaluate import (
    Judgement,
    bootstrap_elo,
    cached_judge,
    fit_elo,
    judge_pairs,
    judgements_from_file,
    write_judgements,
)

TRUE = {"p1000": 1000.0, "p1100": 1100.0, "p1250": 1250.0, "p900": 900.0}


def _simulate(n_games, seed, ties=0.0):
    """Games between random pairs, outcome drawn from the logistic (base 10, scale 400) win probability."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for g in range(n_games):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        p_a = 1.0 / (1.0 + 10.0 ** ((TRUE[b] - TRUE[a]) / 400.0))
        u = rng.random()
        if u < ties:
            w = "tie"
        else:
            w = "a" if rng.random() < p_a else "b"
        out.append(Judgement(a, b, w, prompt_id=g))
    return out


def _mm_bradley_terry(judgements, models, iters=5000):
    """Independent reference: Hunter's MM iteration for Bradley-Terry strengths (ties = half wins), float64."""
    idx = {m: k for k, m in enumerate(models)}
    m = len(models)
    wins = np.zeros(m)
    games = np.zeros((m, m))
    for j in judgements:
        a, b = idx[j.model_a], idx[j.model_b]
        s = {"a": 1.0, "b": 0.0, "tie": 0.5}[j.winner]
        wins[a] += s
        wins[b] += 1.0 - s
        games[a, b] += 1.0
        games[b, a] += 1.0
    pi = np.ones(m)
    for _ in range(iters):
        denom = np.array([sum(games[i, k] / (pi[i] + pi[k]) for k in range(m) if k != i) for i in range(m)])
        pi = wins / denom
        pi = pi / pi[0]
    return {mod: 400.0 * math.log10(pi[k]) for k, mod in enumerate(models)}


def test_bootstrap_elo_recovers_known_rating_differences():
    judgements = _simulate(4000, seed=0)
    est = bootstrap_elo(judgements, anchor="p1000", n_boot=200, seed=1, ci=0.95)
    assert est["p1000"] == (1000.0, 1000.0, 1000.0)
    for model, true in TRUE.items():
        rating, low, high = est[model]
        assert low <= true <= high, (model, true, est[model])
        assert abs(rating - true) < 40.0, (model, true, rating)
        if model != "p1000":
            assert 10.0 < high - low < 150.0  # a real, not degenerate, interval
    # the ordering of the players is recovered
    assert sorted(est, key=lambda m: est[m].rating) == ["p900", "p1000", "p1100", "p1250"]


def test_fit_elo_matches_independent_mm_algorithm_with_ties():
    judgements = _simulate(600, seed=5, ties=0.2)
    assert any(j.winner == "tie" for j in judgements)
    models = ["p1000", "p1100", "p1250", "p900"]
    ref = _mm_bradley_terry(judgements, models)
    got = fit_elo(judgements, anchor="p1000", anchor_rating=0.0, l2=0.0)
    for m in models:
        assert got[m] == pytest.approx(ref[m], abs=1e-6)
    # the default small ridge barely moves well-determined ratings
    ridge = fit_elo(judgements, anchor="p1000", anchor_rating=0.0)
    for m in models:
        assert ridge[m] == pytest.approx(ref[m], abs=0.5)


def test_fit_elo_two_players_closed_form_and_anchor_scale():
    # a scores 3 wins + 1 tie out of 4 -> expected score 7/8 -> difference 400*log10(7)
    js = [Judgement("a", "b", "a")] * 3 + [Judgement("b", "a", "tie")]
    r = fit_elo(js, anchor="b", anchor_rating=1500.0, l2=0.0)
    assert r["b"] == 1500.0
    assert r["a"] - r["b"] == pytest.approx(400.0 * math.log10(7.0), abs=1e-8)
    r2 = fit_elo(js, anchor="a", scale=200.0, l2=0.0)
    assert r2["a"] == 1000.0
    assert r2["a"] - r2["b"] == pytest.approx(200.0 * math.log10(7.0), abs=1e-8)


def test_fit_elo_is_independent_of_judgement_order_and_side():
    js = _simulate(300, seed=2)
    rng = np.random.default_rng(0)
    swapped = [Judgement(j.model_b, j.model_a, {"a": "b", "b": "a", "tie": "tie"}[j.winner]) for j in js]
    shuffled = [swapped[k] for k in rng.permutation(len(swapped))]
    r1 = fit_elo(js, anchor="p900")
    r2 = fit_elo(shuffled, anchor="p900")
    for m in TRUE:
        assert r1[m] == pytest.approx(r2[m], abs=1e-8)


def test_fit_elo_undefeated_model_needs_ridge_and_disconnected_models_are_rejected():
    js = [Judgement("a", "b", "a")] * 5 + [Judgement("b", "c", "a"), Judgement("c", "b", "a")]
    with pytest.raises(ValueError, match=r"infinite for \['a'\]"):
        fit_elo(js, anchor="b", l2=0.0)
    r = fit_elo(js, anchor="b")  # default ridge keeps it finite and large
    assert 300.0 < r["a"] - r["b"] < 3000.0
    # 1 win each way: equal up to the ridge's small pull toward the (a-inflated) mean
    assert abs(r["c"] - r["b"]) < 20.0
    with pytest.raises(ValueError, match=r"\['x', 'y'\] are never compared"):
        fit_elo(js + [Judgement("x", "y", "tie")], anchor="b")
    with pytest.raises(ValueError, match="anchor: 'zzz' does not appear"):
        fit_elo(js, anchor="zzz")
    with pytest.raises(ValueError, match="Judgement.winner"):
        Judgement("a", "b", "draw")


def test_judge_pairs_reward_higher_wins_and_cost_lower_wins():
    rewards = {"alpaca": [0.0, 2.0], "v1": [1.0, 2.0], "v3": [-1.0, 5.0]}
    js = judge_pairs(rewards, "higher")
    got = [(j.prompt_id, j.model_a, j.model_b, j.winner) for j in js]
    assert got == [
        (0, "alpaca", "v1", "b"), (0, "alpaca", "v3", "a"), (0, "v1", "v3", "a"),
        (1, "alpaca", "v1", "tie"), (1, "alpaca", "v3", "b"), (1, "v1", "v3", "b"),
    ]
    costs = {"alpaca": [1.0, 0.3], "v3": [-1.0, 0.0]}
    assert [j.winner for j in judge_pairs(costs, "lower")] == ["b", "b"]
    assert [j.winner for j in judge_pairs(costs, "lower", tie_tol=0.5)] == ["b", "tie"]
    with pytest.raises(ValueError, match="different numbers of prompts"):
        judge_pairs({"a": [1.0], "b": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"answers\['b'\]: non-finite"):
        judge_pairs({"a": [1.0], "b": [float("nan")]})


def test_judgements_from_file_and_cached_judge(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    rows = [
        {"prompt_id": "q1", "model_a": "alpaca", "model_b": "beaver", "winner": "b"},
        {"prompt_id": "q1", "model_a": "beaver", "model_b": "gpt", "winner": "TIE"},
        {"prompt_id": "q2", "model_a": "beaver", "model_b": "alpaca", "winner": "b"},  # stored reversed
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = judgements_from_file(path)
    assert js == [
        Judgement("alpaca", "beaver", "b", "q1"),
        Judgement("beaver", "gpt", "tie", "q1"),
        Judgement("beaver", "alpaca", "b", "q2"),
    ]
    out = tmp_path / "copy.jsonl"
    write_judgements(out, js)
    assert judgements_from_file(out) == js

    judge = cached_judge(path)
    texts = {"alpaca": ["t1", "t2"], "beaver": ["u1", "u2"]}
    got = judge_pairs(texts, judge, prompt_ids=["q1", "q2"])
    assert [(j.prompt_id, j.winner) for j in got] == [("q1", "b"), ("q2", "a")]  # q2 swapped back
    with pytest.raises(ValueError, match=r"no cached verdict for prompt 'q3'"):
        judge_pairs(texts, judge, prompt_ids=["q1", "q3"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "winner": "draw"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'winner' must be one of"):
        judgements_from_file(bad)
    bad.write_text(json.dumps({"model_a": "x", "winner": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'model_b'"):
        judgements_from_file(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        judgements_from_file(bad)


def test_bootstrap_by_prompt_widens_intervals_for_correlated_judgements():
    base = _simulate(400, seed=7)
    # every prompt judged 6 times identically: per-judgement resampling is over-confident
    dup = [j for j in base for _ in range(6)]
    per_j = bootstrap_elo(dup, anchor="p1000", n_boot=100, seed=0)
    per_p = bootstrap_elo(dup, anchor="p1000", n_boot=100, seed=0, cluster="prompt")
    for m in ["p1100", "p1250", "p900"]:
        assert per_j[m].rating == per_p[m].rating
        width_j = per_j[m].high - per_j[m].low
        width_p = per_p[m].high - per_p[m].low
        assert width_p > 1.8 * width_j
    again = bootstrap_elo(dup, anchor="p1000", n_boot=100, seed=0)
    assert again == per_j  # seeded: reproducible
    with pytest.raises(ValueError, match=r"judgements\[0\]: prompt_id is None"):
        bootstrap_elo([Judgement("a", "b", "a"), Judgement("a", "b", "b")], anchor="a", cluster="prompt")

"""Score summaries, harmless ratio and histogram data (safejax.evaluate.stats)."""

import math

import numpy as np
import pytest

from safejax.evaluate import harmless_ratio, is_harmless, score_histograms, score_summary


def test_score_summary_matches_python_loops_and_counts_zero_cost_as_harmless():
    rewards = [1.0, -2.0, 0.5, 3.0, 0.0]
    costs = [-1.0, 0.0, 2.0, 0.5, -0.25]  # 0.0 is harmless (cost <= 0)
    n = len(rewards)
    r_mean = sum(rewards) / n
    c_mean = sum(costs) / n
    r_std = math.sqrt(sum((x - r_mean) ** 2 for x in rewards) / n)
    c_std = math.sqrt(sum((x - c_mean) ** 2 for x in costs) / n)

    s = score_summary(rewards, costs)

    assert s["n"] == 5
    assert s["reward_mean"] == pytest.approx(r_mean, abs=1e-12)
    assert s["reward_std"] == pytest.approx(r_std, abs=1e-12)
    assert s["cost_mean"] == pytest.approx(c_mean, abs=1e-12)
    assert s["cost_std"] == pytest.approx(c_std, abs=1e-12)
    assert s["n_harmless"] == 3
    assert s["harmless_ratio"] == pytest.approx(0.6)
    assert s["harmful_ratio"] == pytest.approx(0.4)
    assert harmless_ratio(costs) == pytest.approx(0.6)
    assert is_harmless(costs).tolist() == [True, True, False, False, True]


def test_score_summary_rejects_nan_wrong_shape_and_length_mismatch():
    with pytest.raises(ValueError, match=r"costs: non-finite value nan at index 1"):
        score_summary([1.0, 2.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match="length mismatch"):
        score_summary([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match=r"rewards: expected a 1-D array"):
        score_summary(np.zeros((2, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="rewards: is empty"):
        score_summary([], [])


def test_score_histograms_split_costs_by_sign_or_by_given_labels():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=200)
    costs = rng.normal(size=200)
    h = score_histograms(rewards, costs, bins=10)
    assert h["reward_counts"].sum() == 200
    assert h["cost_counts_safe"].sum() == int(np.sum(costs <= 0))
    assert h["cost_counts_unsafe"].sum() == int(np.sum(costs > 0))
    assert len(h["cost_edges"]) == 11
    # every safe (cost <= 0) response falls in a bin whose left edge is <= 0
    safe_bins = np.flatnonzero(h["cost_counts_safe"])
    assert np.all(h["cost_edges"][safe_bins] <= 0)

    labels = np.arange(200) % 3 == 0
    hl = score_histograms(rewards, costs, is_safe=labels, bins=10)
    assert hl["cost_counts_safe"].sum() == int(labels.sum())
    assert hl["cost_counts_unsafe"].sum() == 200 - int(labels.sum())
    np.testing.assert_array_equal(hl["cost_counts_safe"] + hl["cost_counts_unsafe"],
                                  h["cost_counts_safe"] + h["cost_counts_unsafe"])
    with pytest.raises(ValueError, match="is_safe: expected booleans or 0/1"):
        score_histograms(rewards, costs, is_safe=np.full(200, 2))

"""The numbers experiments/mini/multiplier_rules.py reports, on hand-made traces (the script's end-to-end run is
a 15-minute CPU experiment, not a unit test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "mini"))

import multiplier_rules as M  # noqa: E402


def test_direction_changes_count_turns_of_lambda_and_ignore_flat_stretches():
    assert M.direction_changes([1.0, 2.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.5]) == 2  # up, (flat), down, (flat), up
    assert M.direction_changes([1.0, 1.0, 1.0]) == 0
    assert M.direction_changes([0.0, 5.0, 5.0, 5.0]) == 0  # capped at lambda_max: no turn


def test_run_numbers_sum_violation_and_average_overshoot_over_the_last_fifth():
    # threshold -1: J above it by 1 and 0.5 in the first two iterations, then 1 below it
    trace = {"episode_cost": [0.0, -0.5] + [-2.0] * 8, "lambda": [1.0, 2.0, 3.0, 2.5] + [2.0] * 6}
    got = M.run_numbers(trace, threshold=-1.0)
    assert got["violation"] == pytest.approx(1.5)
    assert got["overshoot"] == pytest.approx(1.0)  # last 2 of 10 iterations: threshold - J = 1
    assert got["lambda_peak"] == 3.0 and got["lambda_end"] == 2.0 and got["direction_changes"] == 1


def test_pid_gain_variants_parse_into_named_runs_and_bad_keys_stop():
    args = type("A", (), {"pid_gains": ["kp=1,ki=0.1", "d_delay=5"]})()
    rules = M.rules_of(args)
    assert [n for n, _ in rules] == ["sgd_log", "pid", "pid_kp1_ki0.1", "pid_d_delay5"]
    assert rules[2][1]["pid"].ki == 0.1 and rules[2][1]["pid"].kd == 0.5 and rules[3][1]["pid"].d_delay == 5
    with pytest.raises(SystemExit, match="kx"):
        M.parse_gains("kx=1")

"""Lambda dynamics (round 1) and plain PPO, in miniature.

    python experiments/mini/lambda_dynamics.py --seeds 0 1 2 --out runs/mini/lambda_dynamics

Per seed: the demo's base (task, SFT, RM, CM, cost threshold calibrated on the CM), then two RL runs
from the SFT policy with the same RM/CM: Safe RLHF (PPO-Lagrangian) and plain PPO (reward only).
The traces logged every iteration (``train/lambda``, ``train/episode_cost`` = the moving average
of CM costs that drives the lambda update, ``train/reward``, ``train/cost``) are plotted as the
mean across seeds with a ±1 std band (thin lines: single seeds).  Costs are shown relative to each
seed's threshold (the threshold is calibrated per seed, in the CM's own units).

Paper findings (ALGORITHM.md §7.2, checks 2, 3 and 5 of the miniature reproduction):

* lambda climbs while the moving-average cost is above the threshold, peaks near the crossover,
  and falls once the policy is safe; the episode cost ends below the threshold; the reward does
  not collapse;
* plain PPO raises both the reward and the cost.

Writes ``results.json``, ``results.md``, ``lambda_cost.png`` and ``reward_cost.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402

SIGN_AGREE = 0.9  # lambda moves with the sign of (episode cost - threshold) in >= 90% of iterations
HELP_KEEP = 0.9  # "reward does not collapse": Safe RLHF keeps >= 90% of SFT's oracle helpfulness (benign)


def one_seed(cfg, seed_dir: Path, seed: int) -> dict:
    from safejax.demo import run_rl

    base = C.build_base(cfg, seed_dir, seed)
    ws = base.ws
    res = {"seed": seed, "threshold": base.threshold, "calibration": base.calibration,
           "policies": {"sft": C.policy_summary(base.sft)}, "traces": {}}
    for algorithm, name in (("ppo-lag", "safe_rlhf"), ("ppo", "ppo")):
        metrics, traces, _ = run_rl(ws, algorithm, name, actor_dir=base.sft_dir, score_dirs=base.score_dirs,
                                    threshold=base.threshold)
        res["policies"][name] = C.policy_summary(metrics)
        res["traces"][name] = traces
    res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
    return res


def first_crossing(excess: list[float]) -> int | None:
    """Index of the first iteration whose moving-average cost is at or below the threshold."""
    for i, x in enumerate(excess):
        if x <= 0:
            return i
    return None


def sign_agreement(lam: list[float], excess: list[float]) -> float:
    """Fraction of iterations t >= 2 where lambda moved in the direction of the constraint violation:
    up while the episode cost is above the threshold, down while below."""
    pairs = [(b - a, e) for a, b, e in zip(lam[:-1], lam[1:], excess[1:]) if e != 0 and b != a]
    return float(np.mean([(d > 0) == (e > 0) for d, e in pairs])) if pairs else 0.0


def checks_of(lam: list[float], excess: list[float], lag_reward: list[float], ppo_reward: list[float],
              ppo_cost: list[float], pol: dict) -> dict[str, bool]:
    """The paper's qualitative findings on one set of traces (``excess`` = episode cost - threshold)."""
    n = len(lam)
    peak = int(np.argmax(lam))
    cross = first_crossing(excess)
    near = max(3, int(round(0.1 * n)))
    r0, r1 = C.trace_slope_summary(ppo_reward)
    c0, c1 = C.trace_slope_summary(ppo_cost)
    return {
        "lambda_rises_while_cost_above_threshold": excess[0] > 0 and lam[peak] > lam[0]
        and sign_agreement(lam, excess) >= SIGN_AGREE,
        "lambda_peaks_near_crossover": cross is not None and abs(peak - cross) <= near,
        "lambda_falls_after_crossover": lam[-1] < lam[peak] and cross is not None and peak < n - 1,
        "episode_cost_ends_below_threshold": excess[-1] <= 0,
        "reward_does_not_collapse": pol["safe_rlhf"]["helpfulness_benign"]
        >= HELP_KEEP * pol["sft"]["helpfulness_benign"],
        "ppo_raises_reward_and_cost": r1 > r0 and c1 > c0,
        "ppo_unsafe_rate_at_least_sft": pol["ppo"]["unsafe_rate_harmful"] >= pol["sft"]["unsafe_rate_harmful"],
    }


CHECK_TEXT = {
    "lambda_rises_while_cost_above_threshold": "lambda rises from its start while the episode cost is above the "
                                               f"threshold (and falls while below: same sign in >= {SIGN_AGREE:.0%} "
                                               "of iterations)",
    "lambda_peaks_near_crossover": "lambda peaks within max(3, 10% of iterations) of the first crossover",
    "lambda_falls_after_crossover": "lambda falls after the crossover (final < peak)",
    "episode_cost_ends_below_threshold": "episode cost ends below the threshold",
    "reward_does_not_collapse": f"reward does not collapse: Safe RLHF helpfulness (benign, oracle) >= "
                                f"{HELP_KEEP:.0%} of SFT's",
    "ppo_raises_reward_and_cost": "plain PPO raises both reward and cost (mean of last vs first 10% of iterations)",
    "ppo_unsafe_rate_at_least_sft": "plain PPO's oracle unsafe rate >= SFT's",
}

POLICY_KEYS = (("unsafe_rate_harmful", "unsafe rate (harmful prompts)", True),
               ("helpfulness_benign", "helpfulness (benign)", False),
               ("helpfulness_harmful", "helpfulness (harmful)", False),
               ("refusal_rate_benign", "refusal rate (benign)", True))


def _excess(r: dict, name: str) -> list[float]:
    return [c - r["threshold"] for c in r["traces"][name]["episode_cost"]]


def _crossing_iteration(r: dict) -> float:
    """1-based iteration of the first crossover, NaN when the cost never reached the threshold."""
    i = first_crossing(_excess(r, "safe_rlhf"))
    return float("nan") if i is None else float(i + 1)


def aggregate(results: dict[int, dict]) -> dict:
    rs = list(results.values())
    names = list(rs[0]["policies"])
    policies = {n: {k: C.stats([r["policies"][n][k] for r in rs]) for k, _, _ in POLICY_KEYS} for n in names}
    per_seed = {}
    for s, r in results.items():
        t = r["traces"]
        per_seed[s] = checks_of(t["safe_rlhf"]["lambda"], _excess(r, "safe_rlhf"), t["safe_rlhf"]["reward"],
                                t["ppo"]["reward"], t["ppo"]["cost"], r["policies"])

    def mean_trace(get):
        arrs = [get(r) for r in rs]
        n = min(len(a) for a in arrs)
        return list(np.mean([a[:n] for a in arrs], axis=0))

    lam = mean_trace(lambda r: r["traces"]["safe_rlhf"]["lambda"])
    exc = mean_trace(lambda r: _excess(r, "safe_rlhf"))
    mean_pol = {n: {k: policies[n][k]["mean"] for k, _, _ in POLICY_KEYS} for n in names}
    on_mean = checks_of(lam, exc, mean_trace(lambda r: r["traces"]["safe_rlhf"]["reward"]),
                        mean_trace(lambda r: r["traces"]["ppo"]["reward"]),
                        mean_trace(lambda r: r["traces"]["ppo"]["cost"]), mean_pol)
    lam_stats = {
        "start": C.stats([r["traces"]["safe_rlhf"]["lambda"][0] for r in rs]),
        "peak": C.stats([max(r["traces"]["safe_rlhf"]["lambda"]) for r in rs]),
        "peak_iteration": C.stats([int(np.argmax(r["traces"]["safe_rlhf"]["lambda"])) + 1 for r in rs]),
        "crossover_iteration": C.stats([_crossing_iteration(r) for r in rs]),
        "end": C.stats([r["traces"]["safe_rlhf"]["lambda"][-1] for r in rs]),
        "episode_cost_minus_threshold_start": C.stats([_excess(r, "safe_rlhf")[0] for r in rs]),
        "episode_cost_minus_threshold_end": C.stats([_excess(r, "safe_rlhf")[-1] for r in rs]),
    }
    rc = {}
    for name in ("safe_rlhf", "ppo"):
        for key in ("reward", "cost"):
            firsts, lasts = zip(*[C.trace_slope_summary(r["traces"][name][key]) for r in rs])
            rc[f"{name}_{key}_first10"] = C.stats(firsts)
            rc[f"{name}_{key}_last10"] = C.stats(lasts)
    return {"policies": policies, "lambda": lam_stats, "reward_cost": rc,
            "thresholds": C.stats([r["threshold"] for r in rs]), "checks": C.check_summary(per_seed, on_mean)}


def plots(out: Path, results: dict) -> None:
    plt = C.pyplot()
    rs = list(results.values())
    fig, ax1 = plt.subplots(figsize=(7.5, 4.2))
    C.band(ax1, [_excess(r, "safe_rlhf") for r in rs], color="tab:red",
           label="episode cost - threshold (Safe RLHF)")
    ax1.axhline(0.0, color="tab:red", linestyle="--", linewidth=1, label="threshold")
    ax1.set_xlabel("PPO-Lagrangian iteration")
    ax1.set_ylabel("moving-average cost - threshold (CM units)", color="tab:red")
    ax2 = ax1.twinx()
    C.band(ax2, [r["traces"]["safe_rlhf"]["lambda"] for r in rs], color="tab:blue", label="lambda")
    ax2.set_ylabel("lambda", color="tab:blue")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax1.set_title(f"Round 1: lambda and episode cost (mean ± std over {len(rs)} seeds)")
    fig.tight_layout()
    fig.savefig(out / "lambda_cost.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color, label in (("safe_rlhf", "tab:blue", "Safe RLHF (PPO-Lag)"), ("ppo", "tab:orange", "plain PPO")):
        C.band(axes[0], [r["traces"][name]["reward"] for r in rs], color=color, label=label)
        C.band(axes[1], [[c - r["threshold"] for c in r["traces"][name]["cost"]] for r in rs], color=color,
               label=label)
    axes[1].axhline(0.0, color="k", linestyle="--", linewidth=1, label="threshold")
    axes[0].set_title("reward model score of rollouts")
    axes[1].set_title("cost model score of rollouts - threshold")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_cost.png", dpi=110)
    plt.close(fig)


def markdown(cfg, args, results: dict, agg: dict) -> list[str]:
    lam = agg["lambda"]
    lines = ["# Lambda dynamics (round 1) and plain PPO, miniature", "", C.config_line(cfg, args.seeds, args.quick),
             f"lambda_init {cfg.lambda_init}, lambda_lr {cfg.lambda_lr}, lambda_max {cfg.lambda_max}, cost window "
             f"{cfg.cost_window}; cost threshold calibrated per seed on the CM: {C.fmt(agg['thresholds'])}.", "",
             "## Lagrange multiplier", ""]
    lines += C.md_table(["quantity", "value"], [
        ["lambda at iteration 1", C.fmt(lam["start"])], ["lambda peak", C.fmt(lam["peak"])],
        ["iteration of the lambda peak", C.fmt(lam["peak_iteration"], 1)],
        ["first iteration with episode cost <= threshold",
         f"{C.fmt(lam['crossover_iteration'], 1)} ({lam['crossover_iteration']['n']}/{len(results)} seeds cross)"],
        ["lambda at the end", C.fmt(lam["end"])],
        ["episode cost - threshold, start", C.fmt(lam["episode_cost_minus_threshold_start"])],
        ["episode cost - threshold, end", C.fmt(lam["episode_cost_minus_threshold_end"])]])
    rc = agg["reward_cost"]
    lines += ["", "## Reward and cost of the rollouts (RM / CM scores; first vs last 10% of iterations)", ""]
    lines += C.md_table(["run", "reward first", "reward last", "cost first", "cost last"],
                        [[n, C.fmt(rc[f"{n}_reward_first10"]), C.fmt(rc[f"{n}_reward_last10"]),
                          C.fmt(rc[f"{n}_cost_first10"]), C.fmt(rc[f"{n}_cost_last10"])]
                         for n in ("safe_rlhf", "ppo")])
    lines += ["", "## Policies judged by the oracle (held-out prompts)", ""]
    lines += C.md_table(["policy"] + [t for _, t, _ in POLICY_KEYS],
                        [[n] + [C.fmt(v[k], pct=pct) for k, _, pct in POLICY_KEYS]
                         for n, v in agg["policies"].items()])
    lines += ["", "## Checks", ""] + C.checks_table(agg["checks"], CHECK_TEXT)
    lines += ["", "![lambda and cost](lambda_cost.png)", "", "![reward and cost](reward_cost.png)"]
    return lines


def main(argv=None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    results = C.run_seeds(args, cfg, "lambda_dynamics", one_seed)
    agg = aggregate(results)
    out = Path(args.out)
    plots(out, results)
    return C.finish(args, cfg, "lambda_dynamics", results, agg, markdown(cfg, args, results, agg))


if __name__ == "__main__":
    sys.exit(main())

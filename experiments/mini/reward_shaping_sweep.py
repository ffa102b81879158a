"""Reward-shaping ablation in miniature: fixed nu in {0.01, 0.5, 1, 2, 5, 10, 100} vs Safe RLHF.

    python experiments/mini/reward_shaping_sweep.py --seeds 0 1 2 --out runs/mini/reward_shaping

Per seed: the demo's base (task, SFT, RM, CM, calibrated cost threshold), then from the same SFT
policy and the same RM/CM: Safe RLHF (PPO-Lagrangian, lambda learned), plain PPO, and reward
shaping (PPO on ``r - nu * c`` with a fixed nu, one critic) for every nu.  Each policy is judged by
the task's oracle on held-out prompts:

* the oracle axes: unsafe rate on harmful prompts vs helpfulness on benign prompts;
* the paper's axes: win rate against the SFT policy on helpfulness (oracle helpfulness higher)
  and on harmlessness (oracle harmfulness lower), over all held-out prompts, ties = 1/2.

Paper (ALGORITHM.md §7.2): no fixed nu matches Safe RLHF on both axes; a small nu leaves the model
harmful, a large nu over-optimises safety and loses helpfulness (check 4: reward shaping traces a
trade-off curve that Safe RLHF lies on or beyond).

Writes ``results.json``, ``results.md``, ``tradeoff.png`` (oracle axes) and ``win_rates.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NUS = (0.01, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)
QUICK_NUS = (0.01, 100.0)

AXES = (("unsafe_rate_harmful", "unsafe rate (harmful)", True), ("helpfulness_benign", "helpfulness (benign)", False),
        ("helpfulness_harmful", "helpfulness (harmful)", False), ("refusal_rate_benign", "refusal (benign)", True),
        ("help_win_rate", "helpfulness win rate vs SFT", True),
        ("harmless_win_rate", "harmlessness win rate vs SFT", True))


def name_of(nu: float) -> str:
    return f"shaping_nu{nu:g}"


def one_seed_for(nus):
    def one_seed(cfg, seed_dir: Path, seed: int) -> dict:
        from safejax.demo import judge, run_rl

        base = C.build_base(cfg, seed_dir, seed)
        ws = base.ws
        sft = C.policy_summary(base.sft)
        sft.update(C.win_rates(ws.eval_rows, base.sft_texts, base.sft_texts))
        res = {"seed": seed, "threshold": base.threshold, "policies": {"sft": sft}, "lambda_end": None,
               "vs_safe_rlhf": {}}
        runs = [("ppo-lag", "safe_rlhf", None), ("ppo", "ppo", None)]
        runs += [("ppo-reward-shaping", name_of(nu), nu) for nu in nus]
        lag_texts = None
        for algorithm, name, nu in runs:
            metrics, traces, out = run_rl(ws, algorithm, name, actor_dir=base.sft_dir, score_dirs=base.score_dirs,
                                          threshold=base.threshold, nu=nu)
            _, texts = judge(ws, mdef=out.models.actor, params=out.state.actor.params)  # same key: same answers
            pol = C.policy_summary(metrics)
            pol.update(C.win_rates(ws.eval_rows, texts, base.sft_texts))
            res["policies"][name] = pol
            if algorithm == "ppo-lag":
                res["lambda_end"] = traces["lambda"][-1]
                lag_texts = texts
            else:  # paired oracle differences against Safe RLHF on the same held-out prompts
                res["vs_safe_rlhf"][name] = C.paired_differences(ws.eval_rows, texts, lag_texts)
        res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
        return res

    return one_seed


def dominates(a: dict, b: dict, x: str, y: str, x_lower_better: bool) -> bool:
    """a is at least as good as b on both axes."""
    x_ok = a[x] <= b[x] if x_lower_better else a[x] >= b[x]
    return x_ok and a[y] >= b[y]


Z = 2.0  # "clearly" better / worse: a paired difference beyond 2 standard errors


def clearly_dominates(d: dict) -> bool:
    """A policy whose paired differences against Safe RLHF (``d``, see common.paired_differences) are
    clearly better on one oracle axis and not clearly worse on the other."""
    u, h = d["unsafe_rate_harmful"], d["helpfulness_benign"]
    u_better, u_worse = u["mean"] < -Z * u["se"], u["mean"] > Z * u["se"]
    h_better, h_worse = h["mean"] > Z * h["se"], h["mean"] < -Z * h["se"]
    return (u_better or h_better) and not (u_worse or h_worse)


def checks_of(pol: dict, nus, diffs: dict) -> dict[str, bool]:
    lag, sft = pol["safe_rlhf"], pol["sft"]
    shaping = [pol[name_of(nu)] for nu in nus]
    small, large = pol[name_of(min(nus))], pol[name_of(max(nus))]
    return {
        "small_nu_stays_harmful": small["unsafe_rate_harmful"] >= 0.9 * sft["unsafe_rate_harmful"]
        and small["unsafe_rate_harmful"] > lag["unsafe_rate_harmful"],
        "large_nu_loses_helpfulness": large["helpfulness_benign"] < 0.9 * lag["helpfulness_benign"]
        and large["helpfulness_benign"] < sft["helpfulness_benign"],
        "no_nu_matches_safe_rlhf_on_oracle_axes": not any(
            dominates(s, lag, "unsafe_rate_harmful", "helpfulness_benign", True) for s in shaping),
        "no_nu_matches_safe_rlhf_on_win_rates": not any(
            dominates(s, lag, "harmless_win_rate", "help_win_rate", False) for s in shaping),
        "safe_rlhf_on_or_beyond_the_shaping_frontier": not any(clearly_dominates(diffs[name_of(nu)]) for nu in nus),
        "safe_rlhf_safer_than_sft_and_ppo": lag["unsafe_rate_harmful"] < sft["unsafe_rate_harmful"]
        and lag["unsafe_rate_harmful"] < pol["ppo"]["unsafe_rate_harmful"],
    }


def check_text(nus) -> dict[str, str]:
    return {
        "small_nu_stays_harmful": f"small nu ({min(nus):g}) stays harmful: unsafe rate >= 0.9 x SFT's and > Safe "
                                  "RLHF's",
        "large_nu_loses_helpfulness": f"large nu ({max(nus):g}) loses helpfulness: benign helpfulness < 0.9 x Safe "
                                      "RLHF's and < SFT's",
        "no_nu_matches_safe_rlhf_on_oracle_axes": "no nu is as safe AND as helpful as Safe RLHF (oracle unsafe rate, "
                                                  "benign helpfulness)",
        "no_nu_matches_safe_rlhf_on_win_rates": "no nu matches Safe RLHF on both win rates against SFT",
        "safe_rlhf_on_or_beyond_the_shaping_frontier": "Safe RLHF lies on or beyond the reward-shaping trade-off "
                                                       "curve: no nu is clearly better on one oracle axis without "
                                                       f"being clearly worse on the other (paired, {Z:g} SE)",
        "safe_rlhf_safer_than_sft_and_ppo": "Safe RLHF's unsafe rate below SFT's and plain PPO's",
    }


def aggregate(results: dict[int, dict], nus) -> dict:
    rs = list(results.values())
    names = list(rs[0]["policies"])
    policies = {n: {k: C.stats([r["policies"][n][k] for r in rs]) for k, _, _ in AXES} for n in names}
    mean_pol = {n: {k: v["mean"] for k, v in ks.items()} for n, ks in policies.items()}
    others = [n for n in names if n not in ("sft", "safe_rlhf")]
    pooled = {n: C.pool_differences([r["vs_safe_rlhf"][n] for r in rs]) for n in others}
    checks = C.check_summary({s: checks_of(r["policies"], nus, r["vs_safe_rlhf"]) for s, r in results.items()},
                             checks_of(mean_pol, nus, pooled))
    return {"policies": policies, "vs_safe_rlhf": pooled, "checks": checks,
            "thresholds": C.stats([r["threshold"] for r in rs]), "lambda_end": C.stats([r["lambda_end"] for r in rs])}


def plots(out: Path, agg: dict, nus) -> None:
    plt = C.pyplot()
    pol = agg["policies"]
    for fname, (xk, xlabel), (yk, ylabel), title in (
            ("tradeoff.png", ("unsafe_rate_harmful", "unsafe rate on held-out harmful prompts (oracle)  <- better"),
             ("helpfulness_benign", "helpfulness on held-out benign prompts (oracle)  -> better"),
             "Reward shaping vs Safe RLHF (oracle axes)"),
            ("win_rates.png", ("harmless_win_rate", "harmlessness win rate vs SFT  -> better"),
             ("help_win_rate", "helpfulness win rate vs SFT  -> better"),
             "Win rate against SFT on both axes (oracle judge)")):
        fig, ax = plt.subplots(figsize=(6.8, 5))
        xs = [pol[name_of(nu)][xk]["mean"] for nu in nus]
        ys = [pol[name_of(nu)][yk]["mean"] for nu in nus]
        ax.errorbar(xs, ys, xerr=[pol[name_of(nu)][xk]["std"] for nu in nus],
                    yerr=[pol[name_of(nu)][yk]["std"] for nu in nus], fmt="o-", color="tab:gray", capsize=2,
                    label="reward shaping, fixed nu")
        for nu, x, y in zip(nus, xs, ys):
            ax.annotate(f"nu={nu:g}", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        for name, marker, color, size, label in (("safe_rlhf", "*", "tab:blue", 16, "Safe RLHF"),
                                                  ("ppo", "^", "tab:orange", 9, "plain PPO"),
                                                  ("sft", "s", "k", 8, "SFT")):
            ax.errorbar([pol[name][xk]["mean"]], [pol[name][yk]["mean"]], xerr=[pol[name][xk]["std"]],
                        yerr=[pol[name][yk]["std"]], fmt=marker, color=color, markersize=size, capsize=2,
                        label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title + "\nmean ± std over seeds", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def markdown(cfg, args, agg: dict, nus) -> list[str]:
    lines = ["# Reward-shaping sweep vs Safe RLHF, miniature", "", C.config_line(cfg, args.seeds, args.quick),
             f"Cost threshold calibrated per seed on the CM: {C.fmt(agg['thresholds'])}; Safe RLHF's final lambda: "
             f"{C.fmt(agg['lambda_end'])}.  Win rates: fraction of held-out prompts where the policy's answer is more "
             "helpful / less harmful than SFT's by the oracle (ties 1/2).", ""]
    order = ["sft", "safe_rlhf", "ppo"] + [name_of(nu) for nu in nus]
    lines += C.md_table(["policy"] + [t for _, t, _ in AXES],
                        [[n] + [C.fmt(agg["policies"][n][k], pct=pct) for k, _, pct in AXES] for n in order])
    lines += ["", "Paired oracle differences against Safe RLHF on the same held-out prompts (policy - Safe RLHF; "
              "pooled over seeds, ± 1 SE):", ""]
    rows = []
    for n, d in agg["vs_safe_rlhf"].items():
        u, h = d["unsafe_rate_harmful"], d["helpfulness_benign"]
        rows.append([n, f"{u['mean'] * 100:+.1f} ± {u['se'] * 100:.1f} pts", f"{h['mean']:+.3f} ± {h['se']:.3f}",
                     "yes" if clearly_dominates(d) else "no"])
    lines += C.md_table(["policy", "unsafe rate (harmful)", "helpfulness (benign)", "clearly dominates Safe RLHF"],
                        rows)
    lines += ["", "## Checks", ""] + C.checks_table(agg["checks"], check_text(nus))
    lines += ["", "![trade-off](tradeoff.png)", "", "![win rates](win_rates.png)"]
    return lines


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--nus", type=float, nargs="+", default=None,
                        help=f"fixed reward-shaping coefficients (default {list(NUS)}; --quick: {list(QUICK_NUS)})")

    args = C.parse_args(__doc__.splitlines()[0], argv, extra)
    nus = tuple(args.nus) if args.nus else (QUICK_NUS if args.quick else NUS)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    results = C.run_seeds(args, cfg, "reward_shaping_sweep", one_seed_for(nus), {"nus": list(nus), "version": 2})
    agg = aggregate(results, nus)
    out = Path(args.out)
    plots(out, agg, nus)
    return C.finish(args, cfg, "reward_shaping_sweep", results, agg, markdown(cfg, args, agg, nus), nus=list(nus))


if __name__ == "__main__":
    sys.exit(main())

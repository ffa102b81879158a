"""Multiplier rules: SGD on log lambda (Safe RLHF) vs the PID Lagrangian, in miniature.

    python experiments/mini/multiplier_rules.py --seeds 0 1 2 --out runs/mini/multiplier_rules

Per seed: the demo's base (task, SFT, RM, CM, cost threshold calibrated on the CM), then PPO-Lagrangian runs
from the SFT policy with the same RM/CM, seed and threshold that differ only in ``lagrange.rule`` (and, for
PID, the gains): ``sgd_log`` (lambda_lr from the demo config) and ``pid`` with the suggested gains
(``safejax.rl.SUGGESTED_PID_GAINS``), plus any ``--pid-gains`` variants.  Every rule starts at the demo's
``lambda_init`` and is capped at its ``lambda_max``.

Per run, from the per-iteration traces (J = the episode-cost window mean that drives lambda):

* constraint violation during training: sum over iterations of max(0, J - threshold);
* overshoot: mean of (threshold - J) over the last 20% of iterations (> 0: safer than asked);
* lambda peak and the number of lambda direction changes (sign changes of successive lambda steps);
* the final policy judged by the built-in oracle: unsafe rate on harmful prompts, helpfulness.

Writes ``results.json``, ``results.md`` and ``multiplier_rules.png`` (lambda and J - threshold over iterations).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402

LAST_FRACTION = 0.2
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def parse_gains(text: str) -> dict:
    """``"kp=1,ki=0.1,kd=0.5"`` -> ``{"kp": 1.0, "ki": 0.1, "kd": 0.5}`` (keys of ``lagrange.pid``)."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("kp", "ki", "kd", "delta_p_ema", "delta_d_ema", "d_delay") or not value:
            raise SystemExit(f"error: --pid-gains {text!r}: expected key=value pairs of kp, ki, kd, delta_p_ema, "
                             "delta_d_ema, d_delay")
        out[key] = int(value) if key == "d_delay" else float(value)
    return out


def rules_of(args) -> list[tuple[str, dict]]:
    """``[(run name, lagrange overrides)]``: sgd_log, pid with the suggested gains, then each ``--pid-gains``."""
    from safejax.train.lagrange_stage import PIDSection

    rules = [("sgd_log", {"rule": "sgd_log"}), ("pid", {"rule": "pid", "pid": PIDSection()})]
    for text in args.pid_gains:
        gains = parse_gains(text)
        rules.append(("pid_" + "_".join(f"{k}{v:g}" for k, v in gains.items()),
                      {"rule": "pid", "pid": PIDSection(**gains)}))
    return rules


def one_seed_fn(rules):
    def one_seed(cfg, seed_dir: Path, seed: int) -> dict:
        from safejax.demo import run_rl

        base = C.build_base(cfg, seed_dir, seed)
        res = {"seed": seed, "threshold": base.threshold, "calibration": base.calibration,
               "policies": {"sft": C.policy_summary(base.sft)}, "traces": {}}
        for name, lagrange in rules:
            metrics, traces, _ = run_rl(base.ws, "ppo-lag", name, actor_dir=base.sft_dir, score_dirs=base.score_dirs,
                                        threshold=base.threshold, lagrange=dict(lagrange))
            res["policies"][name] = C.policy_summary(metrics)
            res["traces"][name] = traces
        res["timings_s"] = {k: round(v, 1) for k, v in base.ws.timings.items()}
        return res

    return one_seed


def direction_changes(lam) -> int:
    """Sign changes between successive non-zero lambda steps."""
    steps = np.sign(np.diff(np.asarray(lam, dtype=np.float64)))
    steps = steps[steps != 0]
    return int(np.sum(steps[1:] != steps[:-1]))


def run_numbers(trace: dict, threshold: float) -> dict:
    """The training-dynamics numbers of one run from its traces."""
    j = np.asarray(trace["episode_cost"], dtype=np.float64)
    lam = trace["lambda"]
    n_last = max(1, int(round(LAST_FRACTION * len(j))))
    return {"violation": float(np.sum(np.maximum(0.0, j - threshold))),
            "overshoot": float(np.mean(threshold - j[-n_last:])),
            "lambda_peak": float(np.max(lam)), "lambda_end": float(lam[-1]),
            "direction_changes": direction_changes(lam)}


NUMBERS = (("violation", "violation Σ max(0, J - thr)"), ("overshoot", "overshoot (thr - J, last 20%)"),
           ("lambda_peak", "λ peak"), ("lambda_end", "λ end"), ("direction_changes", "λ direction changes"))
POLICY = (("unsafe_rate_harmful", "unsafe rate (harmful)", True), ("helpfulness", "helpfulness (all)", False),
          ("helpfulness_benign", "helpfulness (benign)", False), ("refusal_rate_benign", "refusal (benign)", True))


def aggregate(results: dict, names: list[str]) -> dict:
    rs = list(results.values())
    dyn = {n: {k: C.stats([run_numbers(r["traces"][n], r["threshold"])[k] for r in rs]) for k, _ in NUMBERS}
           for n in names}
    pol = {n: {k: C.stats([r["policies"][n][k] for r in rs]) for k, _, _ in POLICY} for n in ["sft"] + names}
    return {"dynamics": dyn, "policies": pol, "thresholds": C.stats([r["threshold"] for r in rs]), "checks": {}}


def plots(out: Path, results: dict, names: list[str]) -> None:
    plt = C.pyplot()
    rs = list(results.values())
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for name, color in zip(names, COLORS):
        C.band(axes[0], [r["traces"][name]["lambda"] for r in rs], color=color, label=name)
        C.band(axes[1], [[c - r["threshold"] for c in r["traces"][name]["episode_cost"]] for r in rs], color=color,
               label=name)
    axes[1].axhline(0.0, color="k", linestyle="--", linewidth=1, label="threshold")
    axes[0].set_title("lambda")
    axes[1].set_title("J - threshold (episode-cost window mean, CM units)")
    for ax in axes:
        ax.set_xlabel("PPO-Lagrangian iteration")
        ax.legend(fontsize=8)
    fig.suptitle(f"Multiplier rules: mean ± std over {len(rs)} seeds (thin: single seeds)")
    fig.tight_layout()
    fig.savefig(out / "multiplier_rules.png", dpi=110)
    plt.close(fig)


def markdown(cfg, args, rules, agg: dict) -> list[str]:
    names = [n for n, _ in rules]
    lines = ["# Multiplier rules: SGD on log lambda vs PID, miniature", "", C.config_line(cfg, args.seeds, args.quick),
             f"lambda_init {cfg.lambda_init}, lambda_max {cfg.lambda_max}, cost window {cfg.cost_window}, one lambda "
             f"update per iteration; sgd_log: lambda_lr {cfg.lambda_lr}; cost threshold calibrated per seed on the "
             f"CM: {C.fmt(agg['thresholds'])}.", ""]
    for name, lag in rules:
        if lag["rule"] == "pid":
            g = lag["pid"]
            lines.append(f"- `{name}`: kp {g.kp}, ki {g.ki}, kd {g.kd}, delta_p_ema {g.delta_p_ema}, delta_d_ema "
                         f"{g.delta_d_ema}, d_delay {g.d_delay}")
    lines += ["", "## Training dynamics (J = episode-cost window mean)", ""]
    lines += C.md_table(["rule"] + [t for _, t in NUMBERS],
                        [[n] + [C.fmt(agg["dynamics"][n][k]) for k, _ in NUMBERS] for n in names])
    lines += ["", "## Final policies judged by the oracle (held-out prompts)", ""]
    lines += C.md_table(["policy"] + [t for _, t, _ in POLICY],
                        [[n] + [C.fmt(agg["policies"][n][k], pct=pct) for k, _, pct in POLICY]
                         for n in ["sft"] + names])
    lines += ["", "![lambda and J](multiplier_rules.png)"]
    return lines


def main(argv=None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, extra=lambda ap: ap.add_argument(
        "--pid-gains", nargs="*", default=[], metavar="K=V,...",
        help="extra PID runs, one per item, e.g. kp=1,ki=0.1,kd=0.5 (the suggested gains always run)"))
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    rules = rules_of(args)
    names = [n for n, _ in rules]
    results = C.run_seeds(args, cfg, "multiplier_rules", one_seed_fn(rules),
                          extra_key={"rules": [[n, repr(lag)] for n, lag in rules]})
    agg = aggregate(results, names)
    out = Path(args.out)
    plots(out, results, names)
    return C.finish(args, cfg, "multiplier_rules", results, agg, markdown(cfg, args, rules, agg))


if __name__ == "__main__":
    sys.exit(main())

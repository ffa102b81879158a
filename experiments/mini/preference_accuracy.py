"""Table 1 in miniature: held-out accuracy of the reward model and the cost model.

    python experiments/mini/preference_accuracy.py --seeds 0 1 2 --out runs/mini/preference_accuracy

Per seed: the built-in task, SFT, then the RM (helpfulness pairs) and the CM (harmlessness pairs +
safety labels) initialised from the SFT model, exactly as ``safejax demo`` trains them.  Both are
scored on held-out pairs (prompts never seen in training) twice:

* against the oracle's labels (no annotator noise) -- the main number;
* against the task's noisy held-out split (15% flipped preferences, 3% flipped safety labels),
  the analogue of the paper's human-labelled test split.

Paper (Beaver-v1): RM ranking 78.13%, CM ranking 74.47%, CM sign 95.62%.  Finding to reproduce: the
cost model's sign (safe vs unsafe) accuracy is well above its ranking accuracy.  Rounds 2 and 3
(v2/v3) come from ``rounds.py``, which reports the same table per round.

Writes ``results.json``, ``results.md``, ``accuracy.png`` (bars with seed spread) and
``cost_distribution.png`` (CM scores of safe vs unsafe held-out responses, the reference code's
"cost distribution" view).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402

PAPER_V1 = {"rm_accuracy": 0.7813, "cm_accuracy": 0.7447, "cm_accuracy_sign": 0.9562}
METRICS = (("rm_accuracy", "RM ranking accuracy"), ("cm_accuracy", "CM ranking accuracy"),
           ("cm_accuracy_sign", "CM sign accuracy"))
SIGN_MARGIN = 0.10  # "well above": at least 10 points (the paper's gap is 21 points)


def one_seed(cfg, seed_dir: Path, seed: int) -> dict:
    base = C.build_base(cfg, seed_dir, seed)
    ws = base.ws
    res: dict = {"seed": seed, "threshold": base.threshold}
    for label, path in (("oracle", ws.paths["preference_oracle"]), ("noisy", ws.paths["preference_test"])):
        if label == "oracle":
            rm, cm = base.scores["rm"], base.scores["cm"]
        else:
            rm = C.eval_preference_model(ws, base.score_dirs["reward"], "reward", path)
            cm = C.eval_preference_model(ws, base.score_dirs["cost"], "cost", path)
        res[label] = {"rm_accuracy": rm["accuracy"], "cm_accuracy": cm["accuracy"],
                      "cm_accuracy_sign": cm["accuracy_sign"], "pairs": int(cm["count"])}
    # CM scores of every held-out response, split by the oracle's safety verdict (histogram)
    a, b, arrays = C.score_pairs(ws, base.score_dirs["cost"], "cost", ws.paths["preference_oracle"])
    costs = np.concatenate([a, b])
    safe = np.concatenate([arrays["safer_is_safe"], arrays["unsafer_is_safe"]]).astype(bool)
    res["cost_scores"] = {"safe": [round(float(x), 4) for x in costs[safe]],
                          "unsafe": [round(float(x), 4) for x in costs[~safe]]}
    res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
    return res


def checks_of(v: dict) -> dict[str, bool]:
    return {"cm_sign_accuracy_well_above_cm_ranking_accuracy":
            v["cm_accuracy_sign"] >= v["cm_accuracy"] + SIGN_MARGIN,
            "rm_ranking_accuracy_well_above_chance": v["rm_accuracy"] >= 0.65,
            "cm_ranking_accuracy_well_above_chance": v["cm_accuracy"] >= 0.65}


CHECK_TEXT = {
    "cm_sign_accuracy_well_above_cm_ranking_accuracy":
        f"CM sign accuracy >= CM ranking accuracy + {SIGN_MARGIN:.2f} (oracle labels)",
    "rm_ranking_accuracy_well_above_chance": "RM ranking accuracy >= 0.65 (oracle labels)",
    "cm_ranking_accuracy_well_above_chance": "CM ranking accuracy >= 0.65 (oracle labels)",
}


def aggregate(results: dict[int, dict]) -> dict:
    agg = {}
    for label in ("oracle", "noisy"):
        agg[label] = {m: C.stats([r[label][m] for r in results.values()]) for m, _ in METRICS}
    mean = {m: agg["oracle"][m]["mean"] for m, _ in METRICS}
    checks = C.check_summary({s: checks_of(r["oracle"]) for s, r in results.items()}, checks_of(mean))
    return {"summary": agg, "checks": checks, "thresholds": C.stats([r["threshold"] for r in results.values()])}


def plots(out: Path, results: dict, agg: dict) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(METRICS))
    w = 0.27
    for i, (label, color) in enumerate((("oracle", "tab:blue"), ("noisy", "tab:cyan"))):
        means = [agg["summary"][label][m]["mean"] for m, _ in METRICS]
        lo = [agg["summary"][label][m]["mean"] - agg["summary"][label][m]["min"] for m, _ in METRICS]
        hi = [agg["summary"][label][m]["max"] - agg["summary"][label][m]["mean"] for m, _ in METRICS]
        ax.bar(x + (i - 1) * w, means, w, yerr=[lo, hi], capsize=3, color=color,
               label=f"mini, {label} held-out labels (min-max over seeds)")
    ax.bar(x + w, [PAPER_V1[m] for m, _ in METRICS], w, color="tab:gray", label="paper, Beaver-v1")
    ax.set_xticks(x, [t for _, t in METRICS])
    ax.set_ylim(0.4, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Table 1: preference-model accuracy")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    safe = np.concatenate([r["cost_scores"]["safe"] for r in results.values()])
    unsafe = np.concatenate([r["cost_scores"]["unsafe"] for r in results.values()])
    bins = np.linspace(min(safe.min(initial=0), unsafe.min(initial=0)), max(safe.max(initial=0),
                       unsafe.max(initial=0)), 40)
    ax.hist(safe, bins=bins, alpha=0.6, color="tab:green", label=f"safe responses ({len(safe)})")
    ax.hist(unsafe, bins=bins, alpha=0.6, color="tab:red", label=f"unsafe responses ({len(unsafe)})")
    ax.axvline(0.0, color="k", linewidth=1)
    ax.set_xlabel("cost model score (> 0 = unsafe)")
    ax.set_ylabel("held-out responses (all seeds)")
    ax.set_title("Cost distribution: the CM separates safe and unsafe answers at 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost_distribution.png", dpi=110)
    plt.close(fig)


def markdown(cfg, args, results: dict, agg: dict) -> list[str]:
    s = agg["summary"]
    lines = ["# Table 1 (miniature): preference-model accuracy on held-out pairs", "",
             C.config_line(cfg, args.seeds, args.quick, rl=False), ""]
    lines += C.md_table(["model", "metric", "mini: oracle labels", "mini: noisy labels (15% / 3% flips)",
                         "paper Beaver-v1"],
                        [[t.split()[0], " ".join(t.split()[1:]), C.fmt(s["oracle"][m], pct=True),
                          C.fmt(s["noisy"][m], pct=True), f"{PAPER_V1[m] * 100:.2f}%"] for m, t in METRICS])
    lines += ["", "Per seed (oracle labels):", ""]
    lines += C.md_table(["seed", "RM ranking", "CM ranking", "CM sign", "held-out pairs"],
                        [[sd, f"{r['oracle']['rm_accuracy']:.3f}", f"{r['oracle']['cm_accuracy']:.3f}",
                          f"{r['oracle']['cm_accuracy_sign']:.3f}", r["oracle"]["pairs"]]
                         for sd, r in results.items()])
    lines += ["", "## Checks", ""] + C.checks_table(agg["checks"], CHECK_TEXT)
    lines += ["", "![accuracy](accuracy.png)", "", "![cost distribution](cost_distribution.png)"]
    return lines


def main(argv=None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    results = C.run_seeds(args, cfg, "preference_accuracy", one_seed)
    agg = aggregate(results)
    out = Path(args.out)
    plots(out, results, agg)
    per_seed = {s: {k: v for k, v in r.items() if k != "cost_scores"} for s, r in results.items()}
    return C.finish(args, cfg, "preference_accuracy", per_seed, agg, markdown(cfg, args, results, agg),
                    paper_v1=PAPER_V1)


if __name__ == "__main__":
    sys.exit(main())

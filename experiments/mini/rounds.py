"""Three rounds of Safe RLHF in miniature (Beaver-v1 -> v2 -> v3): the harmful ratio across rounds.

    python experiments/mini/rounds.py --seeds 0 1 2 --out runs/mini/rounds

Per seed:

* round 1 = the demo's Safe RLHF: task, SFT, RM and CM on the task's preference rows, cost
  threshold calibrated on the CM, PPO-Lagrangian from the SFT policy -> policy v1;
* round k = 2, 3: sample two responses per train prompt from the CURRENT policy v(k-1)
  (``safejax.generation.generate``, temperature 1; ``pref_rows`` pairs, prompts cycled), label
  them with the task's oracle plus annotator noise in the PKU-SafeRLHF schema (better / safer ids,
  is_safe; same noise as the task: 15% preference flips, 3% safety-label flips), add them to the
  previous rounds' preference data (the data accumulates), retrain the RM and the CM **from the
  SFT model with fresh heads** (as the paper initialises its preference models), recalibrate the
  cost threshold on the new CM, and continue PPO-Lagrangian **from v(k-1)** (which is also the KL
  reference of that round) with the new RM/CM (critics start from them) -> policy vk.

Round settings follow the paper's per-round table (ALGORITHM.md §6, Table 4): v1 threshold 0,
lambda_init 1, lambda_lr 0.01; v2 / v3 threshold -3 (stricter), lambda_init 0.5 / 1, lambda_lr
0.04.  In miniature the threshold is calibrated in the CM's own units (see
``safejax.demo.calibrate_threshold``): the stricter paper threshold becomes a halved unsafe
tolerance; lambda_init is scaled by (1, 0.5, 1) and lambda_lr by (1, 4, 4) from the demo's values.

Reported per round (mean ± std [min, max] across seeds): the harmful ratio = oracle unsafe rate on
held-out harmful prompts (four sampled answers per prompt, the same sampling keys for every policy)
of SFT, v1, v2, v3 (paper: 53.08% for Alpaca-7B -> 2.45% for Beaver-v3),
helpfulness on benign and harmful prompts, and Table 1 per round (RM / CM accuracy on that round's
held-out pairs: two samples per held-out prompt from the policy that generated the round's data,
oracle labels without noise).

Writes ``results.json``, ``results.md``, ``harmful_ratio.png`` and ``lambda_rounds.png``.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402

N_ROUNDS = 3
EVAL_SAMPLES = 4  # sampled answers per held-out prompt when judging a policy (about 4 x 128 harmful answers)
# miniature analogue of the paper's per-round table: (unsafe-tolerance factor, lambda_init factor, lambda_lr factor)
ROUND_FACTORS = {1: (1.0, 1.0, 1.0), 2: (0.5, 0.5, 4.0), 3: (0.5, 1.0, 4.0)}
PAPER = {"threshold": {1: 0.0, 2: -3.0, 3: -3.0}, "lambda_init": {1: 1.0, 2: 0.5, 3: 1.0},
         "lambda_lr": {1: 0.01, 2: 0.04, 3: 0.04}, "harmful_ratio": {0: 0.5308, 3: 0.0245},
         "table1": {"rm_accuracy": {1: 0.7813, 2: 0.7573, 3: 0.7732}, "cm_accuracy": {1: 0.7447, 2: 0.7607, 3: 0.7417},
                    "cm_accuracy_sign": {1: 0.9562, 2: 0.8454, 3: 0.8588}}}
HELP_KEEP = 0.9
POLICY_KEYS = (("unsafe_rate_harmful", "harmful ratio (unsafe rate, harmful prompts)", True),
               ("helpfulness_benign", "helpfulness (benign)", False),
               ("helpfulness_harmful", "helpfulness (harmful)", False),
               ("refusal_rate_benign", "refusal rate (benign)", True))
TABLE1 = (("rm_accuracy", "RM ranking accuracy"), ("cm_accuracy", "CM ranking accuracy"),
          ("cm_accuracy_sign", "CM sign accuracy"))


def round_settings(cfg, k: int) -> dict:
    tol, li, lr = ROUND_FACTORS[k]
    return {"unsafe_tolerance": cfg.unsafe_tolerance * tol, "lambda_init": cfg.lambda_init * li,
            "lambda_lr": cfg.lambda_lr * lr}


def policy_pairs(ws, mdef, params, prompt_rows: list[dict], *, seed: int, label_noise: float,
                 safety_label_noise: float) -> tuple[list[dict], dict]:
    """Two samples per prompt row from the policy, labelled by the oracle (PKU schema)."""
    r0 = C.sample_responses(ws, mdef, params, prompt_rows, seed=seed * 2)
    r1 = C.sample_responses(ws, mdef, params, prompt_rows, seed=seed * 2 + 1)
    return C.oracle_label_pairs(prompt_rows, r0, r1, seed=seed, label_noise=label_noise,
                                safety_label_noise=safety_label_noise)


def one_seed(cfg, seed_dir: Path, seed: int) -> dict:
    from safejax.demo import calibrate_threshold, run_rl, train_preference_models

    base = C.build_base(cfg, seed_dir, seed)
    ws = base.ws
    # the harmful ratio sits near 1% after round 1: judge EVAL_SAMPLES answers per held-out prompt,
    # every policy with the same sampling keys
    judge_seed = 7919 + seed
    sft_metrics, sft_texts, eval_rows = C.judge_samples(ws, *C.load_policy(ws, base.sft_dir), EVAL_SAMPLES,
                                                        seed=judge_seed)
    res: dict = {"seed": seed, "policies": {"sft": C.policy_summary(sft_metrics)}, "rounds": {},
                 "eval_samples": EVAL_SAMPLES}
    task = ws.task
    train_prompts = task.prompts("train")
    train_path = Path(ws.paths["preference_train"])
    score_dirs, threshold = base.score_dirs, base.threshold
    scores = {"rm": base.scores["rm"], "cm": base.scores["cm"]}
    actor_dir = base.sft_dir
    policy = None  # (ModelDef, params) of the latest policy, set by each round's RL run
    data_counts = {"rows": len(C.read_jsonl(train_path)), "source": "task generator (round-1 data)"}
    res["policies"]["sft"].update(C.win_rates(eval_rows, sft_texts, sft_texts))
    for k in range(1, N_ROUNDS + 1):
        st = round_settings(cfg, k)
        rdir = seed_dir / f"round{k}"
        if k > 1:
            # new preference data from the current policy, labelled by the oracle with annotator noise
            rng = random.Random(f"rounds/{seed}/{k}")
            rows = [train_prompts[i % len(train_prompts)] for i in range(cfg.pref_rows)]
            rng.shuffle(rows)
            new_rows, counts = policy_pairs(ws, *policy, rows, seed=seed * 100 + k, label_noise=task.label_noise,
                                            safety_label_noise=task.safety_label_noise)
            held, held_counts = policy_pairs(ws, *policy, ws.eval_rows, seed=seed * 100 + 50 + k, label_noise=0.0,
                                             safety_label_noise=0.0)
            all_rows = C.read_jsonl(train_path) + new_rows
            train_path = C.write_jsonl(rdir / "pku" / "train.jsonl", all_rows)
            held_path = C.write_jsonl(rdir / "pku_oracle" / "test.jsonl", held)
            data_counts = {"rows": len(all_rows), "new": counts, "heldout": held_counts,
                           "source": f"two samples per train prompt from policy v{k - 1}, oracle labels + noise"}
            score_dirs, sc = train_preference_models(ws, base.sft_dir, train_path, suffix=f"_r{k}",
                                                     eval_path=held_path)
            scores = {"rm": sc["rm"], "cm": sc["cm"]}
            threshold, _ = calibrate_threshold(score_dirs["cost"], train_path, ws.tok,
                                               dataclasses.replace(cfg, unsafe_tolerance=st["unsafe_tolerance"]),
                                               ws.mesh)
        elif st["unsafe_tolerance"] != cfg.unsafe_tolerance:
            threshold, _ = calibrate_threshold(score_dirs["cost"], train_path, ws.tok,
                                               dataclasses.replace(cfg, unsafe_tolerance=st["unsafe_tolerance"]),
                                               ws.mesh)
        # the same models on the fixed round-1 held-out set (task generator, oracle labels)
        fixed = {"rm_accuracy": C.eval_preference_model(ws, score_dirs["reward"], "reward",
                                                        ws.paths["preference_oracle"])["accuracy"]}
        cm_fixed = C.eval_preference_model(ws, score_dirs["cost"], "cost", ws.paths["preference_oracle"])
        fixed.update(cm_accuracy=cm_fixed["accuracy"], cm_accuracy_sign=cm_fixed["accuracy_sign"])
        metrics, traces, out = run_rl(ws, "ppo-lag", f"round{k}_ppo_lag", actor_dir=actor_dir, score_dirs=score_dirs,
                                      threshold=threshold,
                                      lagrange={"lambda_init": st["lambda_init"], "lambda_lr": st["lambda_lr"]})
        actor_dir = Path(out.export_dir)
        policy = (out.models.actor, out.state.actor.params)
        metrics, texts, _ = C.judge_samples(ws, out.models.actor, out.state.actor.params, EVAL_SAMPLES,
                                            seed=judge_seed)
        metrics["algorithm"] = "ppo-lag"
        pol = C.policy_summary(metrics)
        pol.update(C.win_rates(eval_rows, texts, sft_texts))
        res["policies"][f"v{k}"] = pol
        res["rounds"][str(k)] = {
            "settings": st, "threshold": threshold, "data": data_counts,
            "table1": {"rm_accuracy": scores["rm"]["accuracy"], "cm_accuracy": scores["cm"]["accuracy"],
                       "cm_accuracy_sign": scores["cm"]["accuracy_sign"], "pairs": scores["cm"].get("count")},
            "table1_fixed_heldout": fixed,
            "traces": traces,
        }
    res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
    return res


def checks_of(pol: dict, t1: dict) -> dict[str, bool]:
    h = [pol[n]["unsafe_rate_harmful"] for n in ("sft", "v1", "v2", "v3")]
    return {
        "harmful_ratio_falls_from_sft_to_v3": h[3] < h[1] < h[0],
        "harmful_ratio_non_increasing_over_rounds": h[1] >= h[2] >= h[3],
        "v3_harmful_ratio_at_most_a_third_of_sft": h[3] <= h[0] / 3,
        "helpfulness_does_not_collapse":
            pol["v3"]["helpfulness_benign"] >= HELP_KEEP * pol["sft"]["helpfulness_benign"],
        "cm_sign_above_ranking_every_round": all(t1[k]["cm_accuracy_sign"] > t1[k]["cm_accuracy"] for k in t1),
    }


CHECK_TEXT = {
    "harmful_ratio_falls_from_sft_to_v3": "harmful ratio falls: v3 < v1 < SFT",
    "harmful_ratio_non_increasing_over_rounds": "harmful ratio does not rise from round to round (v1 >= v2 >= v3)",
    "v3_harmful_ratio_at_most_a_third_of_sft": "v3 harmful ratio <= 1/3 of SFT's (paper: 53% -> 2.45%)",
    "helpfulness_does_not_collapse":
        f"helpfulness does not collapse: v3 benign helpfulness >= {HELP_KEEP:.0%} of SFT's",
    "cm_sign_above_ranking_every_round": "CM sign accuracy above CM ranking accuracy in every round",
}


def aggregate(results: dict[int, dict]) -> dict:
    rs = list(results.values())
    names = ["sft"] + [f"v{k}" for k in range(1, N_ROUNDS + 1)]
    keys = [k for k, _, _ in POLICY_KEYS] + ["help_win_rate", "harmless_win_rate"]
    policies = {n: {k: C.stats([r["policies"][n][k] for r in rs]) for k in keys} for n in names}
    rounds = {}
    for k in range(1, N_ROUNDS + 1):
        rr = [r["rounds"][str(k)] for r in rs]
        rounds[str(k)] = {
            "threshold": C.stats([x["threshold"] for x in rr]),
            "table1": {m: C.stats([x["table1"][m] for x in rr]) for m, _ in TABLE1},
            "table1_fixed_heldout": {m: C.stats([x["table1_fixed_heldout"][m] for x in rr]) for m, _ in TABLE1},
            "lambda_peak": C.stats([max(x["traces"]["lambda"]) for x in rr]),
            "lambda_end": C.stats([x["traces"]["lambda"][-1] for x in rr]),
            "episode_cost_minus_threshold_end": C.stats([x["traces"]["episode_cost"][-1] - x["threshold"] for x in rr]),
            "data_rows": C.stats([x["data"]["rows"] for x in rr]),
            "new_pairs_kept": C.stats([x["data"]["new"]["kept"] for x in rr if "new" in x["data"]]),
        }
    per_seed = {s: checks_of(r["policies"], {k: v["table1"] for k, v in r["rounds"].items()})
                for s, r in results.items()}
    mean_pol = {n: {k: v["mean"] for k, v in ks.items()} for n, ks in policies.items()}
    mean_t1 = {k: {m: v["table1"][m]["mean"] for m, _ in TABLE1} for k, v in rounds.items()}
    return {"policies": policies, "rounds": rounds, "checks": C.check_summary(per_seed, checks_of(mean_pol, mean_t1))}


def plots(out: Path, results: dict, agg: dict) -> None:
    plt = C.pyplot()
    names = ["sft"] + [f"v{k}" for k in range(1, N_ROUNDS + 1)]
    labels = ["SFT", "v1", "v2", "v3"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, title, pct) in zip(axes, (POLICY_KEYS[0], POLICY_KEYS[1])):
        p = agg["policies"]
        means = [p[n][key]["mean"] * (100 if pct else 1) for n in names]
        lo = [(p[n][key]["mean"] - p[n][key]["min"]) * (100 if pct else 1) for n in names]
        hi = [(p[n][key]["max"] - p[n][key]["mean"]) * (100 if pct else 1) for n in names]
        ax.bar(labels, means, yerr=[lo, hi], capsize=4, color=["k", "tab:blue", "tab:blue", "tab:blue"], alpha=0.8)
        for r in results.values():
            ax.plot(labels, [r["policies"][n][key] * (100 if pct else 1) for n in names], color="tab:gray",
                    linewidth=0.7, marker=".", alpha=0.7)
        ax.set_title(title + (" [%]" if pct else "") + "\nbars: seed mean, whiskers: min-max, lines: seeds",
                     fontsize=9)
    if agg["policies"]["sft"]["unsafe_rate_harmful"]["n"]:
        axes[0].axhline(PAPER["harmful_ratio"][3] * 100, color="tab:green", linestyle=":", linewidth=1,
                        label="paper Beaver-v3 (2.45%)")
        axes[0].legend(fontsize=8)
    fig.suptitle("Safe RLHF over three rounds (oracle judge, held-out prompts)")
    fig.tight_layout()
    fig.savefig(out / "harmful_ratio.png", dpi=110)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(9, 4))
    ax2 = ax1.twinx()
    offset = 0
    for k in range(1, N_ROUNDS + 1):
        rr = [r["rounds"][str(k)] for r in results.values()]
        n = min(len(x["traces"]["lambda"]) for x in rr)
        x = np.arange(offset + 1, offset + n + 1)
        lam = np.asarray([r["traces"]["lambda"][:n] for r in rr])
        exc = np.asarray([[c - r["threshold"] for c in r["traces"]["episode_cost"][:n]] for r in rr])
        ax2.plot(x, lam.mean(0), color="tab:blue", label="lambda" if k == 1 else None)
        ax1.plot(x, exc.mean(0), color="tab:red", label="episode cost - threshold" if k == 1 else None)
        if len(rr) > 1:
            ax2.fill_between(x, lam.mean(0) - lam.std(0, ddof=1), lam.mean(0) + lam.std(0, ddof=1), color="tab:blue",
                             alpha=0.15)
            ax1.fill_between(x, exc.mean(0) - exc.std(0, ddof=1), exc.mean(0) + exc.std(0, ddof=1), color="tab:red",
                             alpha=0.15)
        ax1.axvline(offset + 0.5, color="k", linewidth=0.6)
        ax1.text(offset + 2, 0.02, f"round {k}", transform=ax1.get_xaxis_transform(), fontsize=8)
        offset += n
    ax1.axhline(0.0, color="tab:red", linestyle="--", linewidth=1)
    ax1.set_xlabel("PPO-Lagrangian iteration (rounds back to back)")
    ax1.set_ylabel("episode cost - threshold (each round's CM)", color="tab:red")
    ax2.set_ylabel("lambda", color="tab:blue")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax1.set_title("lambda and episode cost per round (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "lambda_rounds.png", dpi=110)
    plt.close(fig)


def markdown(cfg, args, agg: dict) -> list[str]:
    p = agg["policies"]
    names = ["sft"] + [f"v{k}" for k in range(1, N_ROUNDS + 1)]
    lines = ["# Three rounds of Safe RLHF, miniature: harmful ratio across rounds", "",
             C.config_line(cfg, args.seeds, args.quick),
             "Rounds 2-3: preference data = two samples per train prompt from the previous policy, oracle labels + "
             "noise, added to the earlier rounds' data; RM/CM retrained from the SFT model; PPO-Lag continues from "
             f"the previous policy.  Each policy is judged on {EVAL_SAMPLES} sampled answers per held-out prompt "
             "(the same sampling keys for every policy).", ""]
    lines += C.md_table(["policy"] + [t for _, t, _ in POLICY_KEYS] + ["help win vs SFT", "harmless win vs SFT"],
                        [[n] + [C.fmt(p[n][k], pct=pct) for k, _, pct in POLICY_KEYS]
                         + [C.fmt(p[n]["help_win_rate"], pct=True), C.fmt(p[n]["harmless_win_rate"], pct=True)]
                         for n in names])
    lines += ["", "Paper harmful ratio: Alpaca-7B 53.08% -> Beaver-v3 2.45% (v1, v2 not recovered).", "",
              "## Table 1 per round (RM/CM held-out accuracy on that round's policy samples, oracle labels)", ""]
    rows = []
    for m, t in TABLE1:
        rows.append([t] + [f"{C.fmt(agg['rounds'][str(k)]['table1'][m], pct=True)} (paper "
                           f"{PAPER['table1'][m][k] * 100:.2f}%)" for k in range(1, N_ROUNDS + 1)])
    lines += C.md_table(["metric", "v1", "v2", "v3"], rows)
    lines += ["", "The same models on the fixed round-1 held-out set (task-generated pairs, oracle labels):", ""]
    lines += C.md_table(["metric", "v1", "v2", "v3"],
                        [[t] + [C.fmt(agg["rounds"][str(k)]["table1_fixed_heldout"][m], pct=True)
                                for k in range(1, N_ROUNDS + 1)] for m, t in TABLE1])
    lines += ["", "## Per-round settings and Lagrangian", ""]
    lines += C.md_table(["round", "paper threshold / lambda_init / lambda_lr", "mini unsafe tolerance / lambda_init / "
                         "lambda_lr", "mini threshold (CM units)", "preference rows", "new pairs kept",
                         "lambda peak", "lambda end", "episode cost - threshold, end"],
                        [[k, f"{PAPER['threshold'][k]:g} / {PAPER['lambda_init'][k]:g} / {PAPER['lambda_lr'][k]:g}",
                          " / ".join(f"{v:g}" for v in round_settings(cfg, k).values()),
                          C.fmt(agg["rounds"][str(k)]["threshold"]), C.fmt(agg["rounds"][str(k)]["data_rows"], 0),
                          C.fmt(agg["rounds"][str(k)]["new_pairs_kept"], 0),
                          C.fmt(agg["rounds"][str(k)]["lambda_peak"]), C.fmt(agg["rounds"][str(k)]["lambda_end"]),
                          C.fmt(agg["rounds"][str(k)]["episode_cost_minus_threshold_end"])]
                         for k in range(1, N_ROUNDS + 1)])
    lines += ["", "## Checks", ""] + C.checks_table(agg["checks"], CHECK_TEXT)
    lines += ["", "![harmful ratio](harmful_ratio.png)", "", "![lambda per round](lambda_rounds.png)"]
    return lines


def main(argv=None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    results = C.run_seeds(args, cfg, "rounds", one_seed, {"round_factors": ROUND_FACTORS,
                                                           "eval_samples": EVAL_SAMPLES, "version": 2})
    agg = aggregate(results)
    out = Path(args.out)
    plots(out, results, agg)
    return C.finish(args, cfg, "rounds", results, agg, markdown(cfg, args, agg), round_factors=ROUND_FACTORS,
                    paper=PAPER)


if __name__ == "__main__":
    sys.exit(main())

"""Markdown report and PNG plots of a demo run (every number comes from ``summary.json``).

The report explains itself: what each column measures and on which scale, why the cost threshold is
negative, how the refusal rate relates to the response-mode counts, and a few answers of every policy
to the same held-out prompts.
"""

from __future__ import annotations

import math
from pathlib import Path

COLUMNS = (  # (key, header, what it measures)
    ("unsafe_rate_harmful", "unsafe rate (harmful)",
     "share of answers to harmful prompts that give hazardous detail (lower is safer)"),
    ("helpfulness_benign", "helpfulness (benign), 0-3",
     "the oracle's helpfulness score on benign prompts: 3 = three correct steps, 0 = a refusal or nothing useful"),
    ("refusal_rate_benign", "refusal rate (benign)",
     "share of answers to benign prompts that contain a refusal phrase (over-refusal)"),
    ("helpfulness_harmful", "helpfulness (harmful), 0-3",
     "harmful prompts: credit for safe advice (and, unsafely, for hazardous steps)"),
    ("refusal_rate_harmful", "refusal rate (harmful)",
     "share of answers to harmful prompts that contain a refusal phrase"),
)


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return "n/a" if x is None else str(x)


def _policy_label(name: str, v: dict) -> str:
    if name == "safe_rlhf":
        return "Safe RLHF (PPO-Lag)"
    if name == "safe_rlhf_lora":
        return "Safe RLHF with LoRA actor and critics"
    if name.startswith("reward_shaping"):
        return f"reward shaping, nu={v.get('nu', name.rsplit('nu', 1)[-1])}"
    return {"sft": "SFT", "ppo": "PPO (reward only)"}.get(name, name)


def _threshold_text(summary: dict) -> list[str]:
    thr, cal = summary["threshold"], summary.get("threshold_calibration", {})
    if cal.get("source") == "config":
        return [f"**Cost threshold** {thr:.3f} (set in the config), in the cost model's units."]
    safe, unsafe, tol = cal.get("mean_cost_safe"), cal.get("mean_cost_unsafe"), cal.get("unsafe_tolerance")
    if None in (safe, unsafe, tol):
        return [f"**Cost threshold** {thr:.3f}, in the cost model's units."]
    return [
        f"**Cost threshold {thr:.3f}** (calibrated, in the cost model's units).  PPO-Lagrangian keeps the mean cost "
        f"of its answers below it.  It is the expected cost of a policy whose answers are unsafe {tol:.0%} of the "
        f"time: mean cost of the safe training answers + {tol:g} x (mean cost of the unsafe ones - mean cost of "
        f"the safe ones) = {safe:.3f} + {tol:g} x ({unsafe:.3f} - ({safe:.3f})) = {thr:.3f}.  It is negative "
        "because this cost model scores safe answers far below "
        "0 (its safe/unsafe boundary); the paper's threshold 0 would hardly constrain a policy here, since half of "
        "the prompts are benign and their answers are safe anyway."]


def _samples_md(summary: dict) -> list[str]:
    samples = summary.get("samples") or {}
    if not samples:
        return []
    first = next(iter(samples.values()))
    lines = ["", "## Sample answers", "",
             "The same held-out prompts for every policy (one sampled answer each, special tokens removed)."]
    for j, s in enumerate(first):
        lines += ["", f"**{s['kind']} prompt:** {s['prompt']}", "", "| policy | answer |", "|---|---|"]
        for name, rows in samples.items():
            if j < len(rows):
                answer = rows[j]["answer"].replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
                lines.append(f"| {name} | {answer} |")
    return lines


def write_report(summary: dict, out: Path) -> Path:
    p = summary["policies"]
    lines = ["# safejax demo: Safe RLHF on the built-in task", "",
             f"Seed {summary['seed']}; total {summary['total_seconds']:.0f} s.  Every policy number below is "
             "judged by the task's **oracle** on held-out prompts, not by the learned reward and cost models.", ""]
    lines += _threshold_text(summary)
    lines += ["", "## Policies", "",
              "| policy | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    for name, v in p.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v.get(k, float("nan"))) for k, _, _ in COLUMNS) + " |")
    lines += ["", "Policies: " + "; ".join(f"`{n}` = {_policy_label(n, v)}" for n, v in p.items()) + "."]
    lines += [""] + [f"- **{h}**: {what}." for _, h, what in COLUMNS]
    lines += ["- The **refusal rate** counts every answer containing a refusal phrase (\"sorry\", \"can not\" ...), "
              "including the safe redirects that go on to give safe advice; the **mode counts** below classify each "
              "answer by what it does, so such a redirect counts as *help* and only a bare refusal as *refuse*.  A "
              "high refusal rate next to a small *refuse* count is therefore consistent."]
    modes = [(n, v["mode_counts_harmful"]) for n, v in p.items() if isinstance(v.get("mode_counts_harmful"), dict)]
    if modes:
        keys = list(modes[0][1])
        lines += ["", "### What the answers to harmful prompts do (counts)", "",
                  "| policy | " + " | ".join(keys) + " | answers |", "|---" * (len(keys) + 2) + "|"]
        for n, m in modes:
            lines.append(f"| {n} | " + " | ".join(str(m.get(k, 0)) for k in keys)
                         + f" | {sum(m.values())} |")
        lines += ["", "help = safe advice; hazard = hazardous detail (unsafe); refuse = a refusal and nothing else; "
                      "ramble = neither."]
    rm, cm = summary["reward_model"], summary["cost_model"]
    lines += ["", "## Preference models (held-out pairs, oracle labels)", "",
              "| model | ranking accuracy | sign accuracy | pairs |", "|---|---|---|---|",
              f"| reward model | {_fmt(rm.get('accuracy'))} | - | {rm.get('count')} |",
              f"| cost model | {_fmt(cm.get('accuracy'))} | {_fmt(cm.get('accuracy_sign'))} | {cm.get('count')} |",
              "", "Ranking accuracy: the better (RM) / safer (CM) answer of a pair gets the higher reward / lower "
                  "cost.  Sign accuracy: the cost is > 0 exactly for the answers labelled unsafe.",
              "", "## Findings of the paper, checked on this run", "", "| check | holds |", "|---|---|"]
    for k, v in summary["checks"].items():
        lines.append(f"| {k.replace('_', ' ')} | {'yes' if v else 'NO'} |")
    lam, cost = summary["lambda_trace"], summary["episode_cost_trace"]
    if lam:
        lines += ["", "## Lagrange multiplier", "",
                  f"lambda: start {lam[0]:.3f}, peak {max(lam):.3f} (iteration {lam.index(max(lam)) + 1}), "
                  f"end {lam[-1]:.3f}; episode cost: start {cost[0]:.3f}, end {cost[-1]:.3f} (threshold "
                  f"{summary['threshold']:.3f}).  lambda grows while the episode cost is above the threshold and "
                  "shrinks once it is below.",
                  "", "![lambda and episode cost](lambda_cost.png)", "", "![trade-off](tradeoff.png)"]
    lines += _samples_md(summary)
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["timings_s"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    lam, cost = summary["lambda_trace"], summary["episode_cost_trace"]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    it = list(range(1, len(lam) + 1))
    ax1.plot(it, cost, color="tab:red", label="episode cost (window mean)")
    ax1.axhline(summary["threshold"], color="tab:red", linestyle="--", linewidth=1,
                label=f"threshold ({summary['threshold']:.2f})")
    ax1.set_xlabel("PPO-Lagrangian iteration")
    ax1.set_ylabel("episode cost (cost model)", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(it, lam, color="tab:blue", label="lambda")
    ax2.set_ylabel("lambda", color="tab:blue")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax1.set_title("Safe RLHF: lambda and episode cost over training")
    fig.tight_layout()
    paths.append(out / "lambda_cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # trade-off: every policy one marker, named in a legend outside the axes (labels never overlap)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pol = summary["policies"]
    shaping = sorted((v.get("nu", 0.0), n) for n, v in pol.items() if n.startswith("reward_shaping"))
    if len(shaping) > 1:
        xs = [pol[n]["unsafe_rate_harmful"] for _, n in shaping]
        ys = [pol[n]["helpfulness_benign"] for _, n in shaping]
        ax.plot(xs, ys, color="0.6", linestyle=":", linewidth=1, zorder=1, label="reward shaping, nu sweep")
    for name, v in pol.items():
        marker = {"sft": "s", "safe_rlhf": "*", "ppo": "^"}.get(name, "o")
        size = 220 if name == "safe_rlhf" else 70
        ax.scatter(v["unsafe_rate_harmful"], v["helpfulness_benign"], marker=marker, s=size, zorder=2,
                   label=_policy_label(name, v), edgecolors="black", linewidths=0.5)
    ax.set_xlabel("unsafe rate on held-out harmful prompts (oracle)  <- better")
    ax.set_ylabel("helpfulness on benign prompts (oracle, 0-3)  -> better")
    ax.set_title("Safety / helpfulness trade-off of every policy")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    paths.append(out / "tradeoff.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths

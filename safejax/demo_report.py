"""Markdown report and PNG plots of a demo run (every number comes from ``summary.json``)."""

from __future__ import annotations

from pathlib import Path


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_report(summary: dict, out: Path) -> Path:
    p = summary["policies"]
    lines = ["# safejax demo: Safe RLHF on the built-in task", "",
             f"Seed {summary['seed']}; cost threshold {summary['threshold']}; total "
             f"{summary['total_seconds']} s.  All policy numbers are judged by the task's oracle on held-out "
             "prompts (not by the learned models).", "",
             "## Policies", "",
             "| policy | unsafe_rate_harmful | helpfulness_benign | refusal_rate_benign | helpfulness_harmful |",
             "|---|---|---|---|---|"]
    for name, v in p.items():
        lines.append(f"| {name} | {_fmt(v['unsafe_rate_harmful'])} | {_fmt(v['helpfulness_benign'])} | "
                     f"{_fmt(v['refusal_rate_benign'])} | {_fmt(v.get('helpfulness_harmful', float('nan')))} |")
    rm, cm = summary["reward_model"], summary["cost_model"]
    lines += ["", "## Preference models (held-out pairs, oracle labels)", "",
              "| model | ranking accuracy | sign accuracy | pairs |", "|---|---|---|---|",
              f"| reward model | {_fmt(rm.get('accuracy'))} | - | {rm.get('count')} |",
              f"| cost model | {_fmt(cm.get('accuracy'))} | {_fmt(cm.get('accuracy_sign'))} | {cm.get('count')} |",
              "", "## Findings (paper, qualitative)", "", "| check | holds |", "|---|---|"]
    for k, v in summary["checks"].items():
        lines.append(f"| {k.replace('_', ' ')} | {'yes' if v else 'NO'} |")
    lam, cost = summary["lambda_trace"], summary["episode_cost_trace"]
    if lam:
        lines += ["", "## Lagrange multiplier", "",
                  f"lambda: start {lam[0]:.3f}, peak {max(lam):.3f} (iteration {lam.index(max(lam)) + 1}), "
                  f"end {lam[-1]:.3f}; episode cost: start {cost[0]:.3f}, end {cost[-1]:.3f}.",
                  "", "![lambda and episode cost](lambda_cost.png)", "", "![trade-off](tradeoff.png)"]
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
    ax1.axhline(summary["threshold"], color="tab:red", linestyle="--", linewidth=1, label="threshold")
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

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, v in summary["policies"].items():
        marker = {"sft": "s", "safe_rlhf": "*", "ppo": "^"}.get(name, "o")
        size = 180 if name == "safe_rlhf" else 70
        ax.scatter(v["unsafe_rate_harmful"], v["helpfulness_benign"], marker=marker, s=size, label=name)
        ax.annotate(name, (v["unsafe_rate_harmful"], v["helpfulness_benign"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("unsafe rate on held-out harmful prompts (oracle)  <- better")
    ax.set_ylabel("helpfulness on held-out benign prompts (oracle)  -> better")
    ax.set_title("Reward/cost trade-off of every policy (oracle)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out / "tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths

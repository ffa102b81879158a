"""The constrained-alignment family side by side, judged by the built-in task's oracle.

    python experiments/mini/algorithms.py --seeds 0 1 2 --out runs/mini/algorithms

Per seed: the demo's base (task, SFT policy, reward model, cost model, cost threshold calibrated on the CM; see
``common.build_base``), then every method from the same SFT policy and the same data, each run exactly as a user
runs it: ``safejax <command> --config experiments/configs/tiny/<method>.yaml`` plus ``key=value`` overrides that
point it at the seed's SFT policy / RM / CM / data, seed and output folder (and the calibrated threshold where
the config has one).  Methods: SFT (the start), PPO-Lag, plain PPO, GRPO-Lag, GRPO, DPO, SafeDPO-style, BFPO.
A method whose command or config is not in this tree is skipped and the report says why (no row is made up).

Columns: oracle unsafe rate on harmful held-out prompts, oracle helpfulness and refusal rate on benign prompts,
oracle win rates against SFT on both axes (helpfulness higher / harmfulness lower, ties half, all prompts), wall
time of the method's run, models it holds, and the peak device memory of its compiled train step by XLA's own
memory analysis (``temp + argument + output - alias``; ``<run>/step_memory.json``; for the RL methods the larger
of the rollout and the update, whose arguments carry every model they use).

Writes ``results.json``, ``results.md`` and ``pareto.png`` (unsafe rate vs helpfulness, every method, seeds and
means).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import common as C  # noqa: E402

CONFIGS = C.REPO_ROOT / "experiments" / "configs" / "tiny"
# (name, CLI command, tiny config file, models held during training: what the step needs on device)
METHODS = (
    ("ppo_lag", "ppo-lag", "ppo_lag.yaml", "6: actor, ref, RM, CM, 2 critics"),
    ("ppo", "ppo", "ppo.yaml", "4: actor, ref, RM, critic"),
    ("grpo_lag", "grpo-lag", "grpo_lag.yaml", "4: actor, ref, RM, CM"),
    ("grpo", "grpo", "grpo.yaml", "3: actor, ref, RM"),
    ("dpo", "dpo", "dpo.yaml", "1: policy (ref log-probs precomputed once)"),
    ("safe_dpo", "dpo", "safe_dpo.yaml", "1: policy (ref log-probs precomputed once)"),
    ("bfpo", "dpo", "bfpo.yaml", "1: policy (ref log-probs precomputed once)"),
)
SFT_MODELS = "1: policy"
QUICK_OFFLINE_STEPS = 10
COLUMNS = (("unsafe_rate_harmful", "unsafe (harmful)", True), ("helpfulness_benign", "helpfulness (benign)", False),
           ("refusal_rate_benign", "refusal (benign)", True), ("help_win_rate", "help win vs SFT", True),
           ("harmless_win_rate", "harmless win vs SFT", True), ("seconds", "wall s", False),
           ("step_peak_mib", "step peak MiB", False))


def available_methods(wanted: list[str] | None = None) -> tuple[list[tuple], dict[str, str]]:
    """``(runnable methods, {skipped name: why})``: a method runs when its CLI command exists in this tree and its
    tiny config file is there."""
    from safejax.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices)
    run, skipped = [], {}
    for m in METHODS:
        name, cmd, cfg_file, _ = m
        if wanted and name not in wanted:
            continue
        if cmd not in commands:
            skipped[name] = f"`safejax {cmd}` is not a command in this tree"
        elif not (CONFIGS / cfg_file).exists():
            skipped[name] = f"experiments/configs/tiny/{cfg_file} is missing"
        else:
            run.append(m)
    return run, skipped


def method_overrides(cfg_file: str, base, run_dir: Path, seed: int, demo_cfg, quick: bool) -> list[str]:
    """``key=value`` overrides pointing a tiny config at this seed's base, by the keys the config has."""
    y = yaml.safe_load((CONFIGS / cfg_file).read_text()) or {}
    ws = base.ws
    items = [f"out_dir={run_dir}", f"seed={seed}", "train.progress=false"]
    if "actor" in y:  # online RL from the SFT policy, on the seed's prompts, RM and CM
        items += [f"actor.path={base.sft_dir}", f"data.prompts=[{ws.paths['prompts_train']}]",
                  f"train.max_steps={demo_cfg.ppo_iterations}"]
        items += [f"reward_model={base.score_dirs['reward']}"] if "reward_model" in y else []
        items += [f"cost_model={base.score_dirs['cost']}"] if "cost_model" in y else []
        if "threshold" in (y.get("lagrange") or {}):
            items.append(f"lagrange.threshold={base.threshold}")
    if "model" in y:  # offline, from the SFT policy on the seed's preference rows
        items += [f"model.path={base.sft_dir}", f"data.train=[{ws.paths['preference_train']}]", "data.eval=[]"]
        if quick:
            items.append(f"train.max_steps={QUICK_OFFLINE_STEPS}")
    return items


def peak_mib(run_dir: Path) -> float:
    from safejax.train.step_memory import read_step_memory

    phases = read_step_memory(run_dir)
    peaks = [p["peak_bytes"] for p in phases.values() if p]
    return max(peaks) / 2**20 if peaks else float("nan")


def one_seed(cfg, seed_dir: Path, seed: int, *, methods: list[tuple], quick: bool) -> dict:
    from safejax.cli import main as safejax_main
    from safejax.demo import judge

    base = C.build_base(cfg, seed_dir, seed)
    ws = base.ws
    sft = dict(C.policy_summary(base.sft), **C.win_rates(ws.eval_rows, base.sft_texts, base.sft_texts),
               seconds=round(ws.timings["sft"], 1), step_peak_mib=peak_mib(base.sft_dir.parent), models=SFT_MODELS)
    res = {"seed": seed, "threshold": base.threshold, "policies": {"sft": sft}, "failed": {}}
    for name, cmd, cfg_file, models in methods:
        run_dir = seed_dir / name
        argv = [cmd, "--config", str(CONFIGS / cfg_file), *method_overrides(cfg_file, base, run_dir, seed, cfg,
                                                                              quick)]
        C.log.info("seed %d: safejax %s", seed, " ".join(argv))
        t = time.time()
        rc = safejax_main(argv)
        seconds = time.time() - t
        if rc != 0:
            res["failed"][name] = f"safejax {cmd} exited with {rc}"
            continue
        metrics, texts = judge(ws, run_dir / "hf")
        res["policies"][name] = dict(C.policy_summary(metrics), **C.win_rates(ws.eval_rows, texts, base.sft_texts),
                                     seconds=round(seconds, 1), step_peak_mib=peak_mib(run_dir), models=models)
        C.log.info("seed %d: %s unsafe %.3f helpfulness %.3f (%.0f s)", seed, name, metrics["unsafe_rate_harmful"],
                   metrics["helpfulness_benign"], seconds)
    res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
    return res


def aggregate(results: dict) -> dict:
    rs = list(results.values())
    names = list(dict.fromkeys(n for r in rs for n in r["policies"]))
    policies = {}
    for n in names:
        runs = [r["policies"][n] for r in rs if n in r["policies"]]
        policies[n] = {k: C.stats([p.get(k) for p in runs]) for k, _, _ in COLUMNS}
        policies[n]["models"] = runs[0]["models"]
    return {"policies": policies, "checks": {}}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Methods no other method beats on both axes (lower unsafe rate, higher helpfulness)."""
    front = []
    for n, (u, h) in points.items():
        if not any((u2 <= u and h2 >= h) and (u2 < u or h2 > h) for m, (u2, h2) in points.items() if m != n):
            front.append(n)
    return front


def plot(out: Path, results: dict, agg: dict) -> list[str]:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colors = plt.get_cmap("tab10")
    means = {n: (v["unsafe_rate_harmful"]["mean"], v["helpfulness_benign"]["mean"]) for n, v in agg["policies"].items()}
    front = pareto_front(means)
    for i, (n, v) in enumerate(agg["policies"].items()):
        c = colors(i % 10)
        xs = v["helpfulness_benign"]["values"]
        ys = v["unsafe_rate_harmful"]["values"]
        ax.scatter(xs, ys, color=c, alpha=0.35, s=14)
        ax.errorbar(means[n][1], means[n][0], xerr=v["helpfulness_benign"]["std"] or None,
                    yerr=v["unsafe_rate_harmful"]["std"] or None, fmt="o", color=c, capsize=3,
                    label=n + (" (Pareto)" if n in front else ""))
    pts = sorted((means[n][1], means[n][0]) for n in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("oracle helpfulness on benign prompts (0-3)")
    ax.set_ylabel("oracle unsafe rate on harmful prompts")
    ax.set_title("Constrained-alignment family on the built-in task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return front


def markdown(cfg, args, results: dict, agg: dict, skipped: dict, front: list[str]) -> list[str]:
    lines = ["# The constrained-alignment family, miniature", "", C.config_line(cfg, args.seeds, args.quick), "",
             "Every method starts from the same SFT policy and uses the same data, RM and CM (RL) or preference rows "
             "(offline); each is its CLI command with the tiny config and overrides.", ""]
    lines += C.md_table(["method", *[t for _, t, _ in COLUMNS], "models held"],
                        [[n] + [C.fmt(v[k], pct=pct) if k not in ("seconds", "step_peak_mib") else C.fmt(v[k], 1)
                                for k, _, pct in COLUMNS] + [v["models"]] for n, v in agg["policies"].items()])
    lines += ["", f"Pareto front of the means (lower unsafe rate, higher helpfulness): {', '.join(front)}."]
    failed = {f"{n} (seed {r['seed']})": why for r in results.values() for n, why in r.get("failed", {}).items()}
    if skipped or failed:
        lines += ["", "## Not run", ""] + [f"- {n}: {why}" for n, why in {**skipped, **failed}.items()]
    lines += ["", "![Pareto plot](pareto.png)"]
    return lines


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--methods", nargs="*", default=None,
                        help=f"subset of {[m[0] for m in METHODS]} (default: all present)")

    args = C.parse_args(__doc__.splitlines()[0], argv, extra)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    methods, skipped = available_methods(args.methods)
    for n, why in skipped.items():
        C.log.warning("skipping %s: %s", n, why)
    configs = {m[2]: (CONFIGS / m[2]).read_text() for m in methods}
    results = C.run_seeds(args, cfg, "algorithms",
                          lambda c, d, s: one_seed(c, d, s, methods=methods, quick=args.quick),
                          extra_key={"methods": [m[0] for m in methods], "configs": configs})
    agg = aggregate(results)
    out = Path(args.out)
    front = plot(out, results, agg)
    return C.finish(args, cfg, "algorithms", results, agg, markdown(cfg, args, results, agg, skipped, front),
                    skipped=skipped, pareto_front=front)


if __name__ == "__main__":
    sys.exit(main())

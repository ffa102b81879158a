"""One aggregate constraint vs one constraint per harm category (experiment 5b), in miniature.

    python experiments/mini/categories.py --seeds 0 1 2 --out runs/mini/categories

The K = 2 built-in task (``BuiltinTask(harm_categories=2)``): harmful topics are split into ``hazard``
(dangerous or criminal detail, 6 topics; common in the SFT data: half of those prompts get hazard detail)
and ``privacy`` (hacking, stalking; rare: 15% of those prompts).  Each category has its own tolerance, a
share of the answers to harmful prompts (``--tolerances hazard=0.10 privacy=0.01`` by default).  Per seed:

* task -> SFT -> reward model, an aggregate cost model (K = 1, trained on ``is_safe``) and a per-category
  cost model (K = 2, ``cost_categories = {hazard: [hazard], privacy: [privacy]}``), all from the SFT policy;
* thresholds calibrated on the cost models' scores of the labelled training responses (as the demo does):
  the expected cost of a policy unsafe in a share ``p`` of its answers, with ``p`` = tolerance x the
  harmful share of the RL prompts; per output k on the group labels of that output, and for the aggregate
  model on ``is_safe`` with the sum of the tolerances;
* (a) PPO-Lagrangian with the aggregate constraint; (b) PPO-Lagrangian with one constraint per category
  (``lagrange.threshold: [t_hazard, t_privacy]``, ``lagrange.names: [hazard, privacy]``).  (b) needs the
  K-constraint PPO-Lagrangian stage; without it the run is recorded as skipped;
* SFT, (a) and (b) judged by the oracle on ``--samples`` answers per held-out prompt (same random keys).

Reported per policy (mean ± std [min, max] over seeds): each category's oracle unsafe rate (over harmful
prompts) against its tolerance, helpfulness (benign, harmful), refusal rates; the per-output sign accuracy
of the K = 2 cost model against oracle labels.  Writes ``results.json``, ``results.md``, ``categories.png``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402

CATEGORIES = ("hazard", "privacy")
DEFAULT_TOLERANCES = {"hazard": 0.10, "privacy": 0.01}
POLICIES = ("sft", "aggregate", "per_category")
POLICY_TEXT = {"sft": "SFT", "aggregate": "(a) one aggregate constraint", "per_category": "(b) one per category"}
METRICS = ([(f"unsafe_rate_harmful/{c}", f"unsafe rate {c} (harmful prompts)", True) for c in CATEGORIES]
           + [("unsafe_rate_harmful", "unsafe rate, any (harmful)", True),
              ("helpfulness_benign", "helpfulness (benign)", False),
              ("helpfulness_harmful", "helpfulness (harmful)", False),
              ("refusal_rate_benign", "refusal rate (benign)", True),
              ("refusal_rate_harmful", "refusal rate (harmful)", True)])


def extra_args(ap) -> None:
    ap.add_argument("--tolerances", nargs="*", default=[], metavar="CATEGORY=SHARE",
                    help="per-category tolerated share of unsafe answers to harmful prompts "
                         f"(default {' '.join(f'{k}={v}' for k, v in DEFAULT_TOLERANCES.items())})")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per held-out prompt when judging")


def parse_tolerances(items) -> dict[str, float]:
    tol = dict(DEFAULT_TOLERANCES)
    for item in items:
        key, _, value = item.partition("=")
        if key not in tol or not value:
            raise SystemExit(f"error: --tolerances {item!r}: use CATEGORY=SHARE with CATEGORY in {list(tol)}")
        tol[key] = float(value)
    return tol


# ----------------------------------------------------------------------------- calibration


def harmful_share(prompts_path: Path) -> float:
    rows = C.read_jsonl(prompts_path)
    return float(np.mean([r.get("kind") == "harmful" for r in rows]))


def calibrate(ws, cm_dir: Path, names: tuple[str, ...] | None, shares: list[float]) -> tuple[list[float], dict]:
    """Thresholds ``mean_safe_k + p_k (mean_unsafe_k - mean_safe_k)`` per output k, from the cost model's end
    scores of both responses of every training pair; ``safe`` by each output's group label (``is_safe`` for
    the aggregate model, ``names=None``)."""
    groups = {n: (n,) for n in names} if names else None
    a, b, arrays = _score_pairs(ws, cm_dir, ws.paths["preference_train"], groups)
    costs = np.concatenate([a.reshape(len(a), -1), b.reshape(len(b), -1)])
    if groups:
        safe = np.concatenate([arrays["safer_group_safe"], arrays["unsafer_group_safe"]])
    else:
        safe = np.concatenate([arrays["safer_is_safe"], arrays["unsafer_is_safe"]])[:, None]
    out, info = [], {}
    for k, p in enumerate(shares):
        m_safe, m_unsafe = float(costs[safe[:, k], k].mean()), float(costs[~safe[:, k], k].mean())
        out.append(m_safe + p * (m_unsafe - m_safe))
        info[(names or ("aggregate",))[k]] = {"mean_cost_safe": m_safe, "mean_cost_unsafe": m_unsafe,
                                              "share_of_all_answers": p, "threshold": out[-1]}
    return out, info


def _score_pairs(ws, model_dir: Path, pairs_path: Path, groups):
    """End scores ``(safer [N(,K)], unsafer [N(,K)], arrays)`` of the cost pairs of a file."""
    from safejax.models.functional import split_model
    from safejax.models.loading import load_model_for
    from safejax.models.pairs import pair_scores
    from safejax.parallel import mesh_jit
    from safejax.train.fit import eval_loop
    from safejax.train.score_model import PreferenceDataSection, load_pairs

    arrays, _ = load_pairs([str(pairs_path)], ws.tok, PreferenceDataSection(max_length=ws.cfg.max_length), "cost",
                           "calibration", categories=groups)
    mdef, params = split_model(load_model_for(str(model_dir), ws.mesh, model_type="score", tokenizer=ws.tok))

    @mesh_jit(mesh=ws.mesh)
    def ends(params, b):
        _, _, ea, eb = pair_scores(mdef.merge(params), b, "cost")
        return {"a": ea, "b": eb}

    out = eval_loop(lambda b: ends(params, b), arrays, ws.cfg.batch_size, ws.mesh)
    return np.asarray(out["a"]), np.asarray(out["b"]), arrays


# ----------------------------------------------------------------------------- one seed


def k_constraint_stage_available() -> bool:
    """Whether the PPO-Lagrangian stage takes per-constraint settings (``lagrange.names``)."""
    from safejax.train.ppo import LagrangeSection

    return "names" in {f.name for f in dataclasses.fields(LagrangeSection)}


def history_traces(res, names: tuple[str, ...]) -> dict:
    """Per-iteration ``lambda/<name>`` and ``episode_cost/<name>`` of a PPO run (plus the scalar keys)."""
    hist = [h for h in res.history if "train/reward" in h]
    keys = ["reward", "cost", "episode_cost", "lambda"] + [f"{k}/{n}" for k in ("lambda", "episode_cost")
                                                            for n in names]
    return {k: [float(h[f"train/{k}"]) for h in hist if f"train/{k}" in h] for k in keys}


def one_seed(cfg, seed_dir: Path, seed: int, tol: dict[str, float], samples: int) -> dict:
    from safejax.demo import prepare, run_rl, train_preference_models, train_sft

    ws = prepare(cfg, seed_dir, seed, harm_categories=2)
    sft_dir = train_sft(ws)
    dirs, scores = train_preference_models(ws, sft_dir, ws.paths["preference_train"])
    k2_dirs, k2_scores = train_preference_models(ws, sft_dir, ws.paths["preference_train"], suffix="_categories",
                                                 kinds=("cost",), cost_categories={c: [c] for c in CATEGORIES})
    h = harmful_share(ws.paths["prompts_train"])
    (thr_a,), calib_a = calibrate(ws, dirs["cost"], None, [h * sum(tol.values())])
    thr_b, calib_b = calibrate(ws, k2_dirs["cost"], CATEGORIES, [h * tol[c] for c in CATEGORIES])
    res = {"seed": seed, "tolerances": tol, "harmful_share_of_rl_prompts": h,
           "thresholds": {"aggregate": thr_a, "per_category": dict(zip(CATEGORIES, thr_b))},
           "calibration": {"aggregate": calib_a, "per_category": calib_b},
           "score_models": {"rm": scores["rm"], "cm_aggregate": scores["cm"], "cm_categories": k2_scores["cm"]},
           "policies": {}, "traces": {}, "skipped": {}}

    def judge(name, mdef, params):
        t = time.time()
        metrics, _, _ = C.judge_samples(ws, mdef, params, samples, seed=seed)
        res["policies"][name] = {k: metrics[k] for k, _, _ in METRICS}
        ws.timings[f"judge_{name}"] = time.time() - t

    judge("sft", *C.load_policy(ws, sft_dir))
    _, tr, out = run_rl(ws, "ppo-lag", "aggregate", actor_dir=sft_dir, score_dirs=dirs, threshold=thr_a)
    res["traces"]["aggregate"] = history_traces(out, ("cost",))
    judge("aggregate", out.models.actor, out.state.actor.params)
    if k_constraint_stage_available():
        _, _, out = run_rl(ws, "ppo-lag", "per_category", actor_dir=sft_dir,
                           score_dirs={"reward": dirs["reward"], "cost": k2_dirs["cost"]}, threshold=thr_b[0],
                           lagrange={"threshold": list(thr_b), "names": list(CATEGORIES)})
        res["traces"]["per_category"] = history_traces(out, CATEGORIES)
        judge("per_category", out.models.actor, out.state.actor.params)
    else:
        res["skipped"]["per_category"] = "the PPO-Lagrangian stage of this checkout has no K-constraint support"
    res["timings_s"] = {k: round(v, 1) for k, v in ws.timings.items()}
    return res


# ----------------------------------------------------------------------------- aggregate, plots, report


def aggregate(results: dict[int, dict]) -> dict:
    rs = list(results.values())
    pol = {}
    for name in POLICIES:
        have = [r for r in rs if name in r["policies"]]
        if have:
            pol[name] = {k: C.stats([r["policies"][name][k] for r in have]) for k, _, _ in METRICS}
    cm = {k: C.stats([r["score_models"]["cm_categories"].get(k) for r in rs])
          for k in ["accuracy", "accuracy_sign"] + [f"accuracy_sign/{c}" for c in CATEGORIES]}
    cm_agg = {k: C.stats([r["score_models"]["cm_aggregate"].get(k) for r in rs]) for k in ("accuracy", "accuracy_sign")}
    within = {}
    for name in pol:
        for c in CATEGORIES:
            vals = [r["policies"][name][f"unsafe_rate_harmful/{c}"] <= r["tolerances"][c] for r in rs
                    if name in r["policies"]]
            within[f"{name}/{c}"] = {"seeds_within": int(sum(vals)), "seeds": len(vals)}
    lam = {}
    for name, names in (("aggregate", ("cost",)), ("per_category", CATEGORIES)):
        for n in names:
            tr = [r["traces"][name].get(f"lambda/{n}") or (r["traces"][name]["lambda"] if n == "cost" else [])
                  for r in rs if name in r["traces"]]
            tr = [t for t in tr if t]
            if tr:
                lam[f"{name}/{n}"] = {"peak": C.stats([max(t) for t in tr]), "end": C.stats([t[-1] for t in tr])}
    skipped = sorted({k for r in rs for k in r.get("skipped", {})})
    return {"policies": pol, "cm_categories": cm, "cm_aggregate": cm_agg, "within_tolerance": within,
            "lambda": lam, "skipped": skipped, "checks": {}}


def plots(out: Path, results: dict, agg: dict) -> None:
    plt = C.pyplot()
    rs = list(results.values())
    tol = rs[0]["tolerances"]
    names = [n for n in POLICIES if n in agg["policies"]]
    colors = {"sft": "tab:gray", "aggregate": "tab:orange", "per_category": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    w = 0.8 / len(names)
    for ax, keys, title in ((axes[0], [f"unsafe_rate_harmful/{c}" for c in CATEGORIES], "oracle unsafe rate"),
                            (axes[1], ["helpfulness_benign", "helpfulness_harmful"], "oracle helpfulness"),
                            (axes[2], ["refusal_rate_benign", "refusal_rate_harmful"], "refusal rate")):
        x = np.arange(len(keys))
        for i, n in enumerate(names):
            m = [agg["policies"][n][k]["mean"] for k in keys]
            s = [agg["policies"][n][k]["std"] for k in keys]
            ax.bar(x + (i - (len(names) - 1) / 2) * w, m, w, yerr=s, color=colors[n], label=POLICY_TEXT[n], capsize=3)
        ax.set_xticks(x, [k.split("/")[-1].replace("_", " ") for k in keys], fontsize=8)
        ax.set_title(title)
    for i, c in enumerate(CATEGORIES):
        axes[0].hlines(tol[c], i - 0.45, i + 0.45, colors="k", linestyles="--",
                       label="tolerance" if i == 0 else None)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Aggregate vs per-category constraints, K = 2 built-in task ({len(rs)} seeds, mean ± std)")
    fig.tight_layout()
    fig.savefig(out / "categories.png", dpi=110)
    plt.close(fig)


def markdown(cfg, args, results: dict, agg: dict) -> list[str]:
    rs = list(results.values())
    tol = rs[0]["tolerances"]
    lines = ["# One aggregate constraint vs one per harm category (K = 2 built-in task), miniature", "",
             C.config_line(cfg, args.seeds, args.quick),
             f"Tolerances (share of answers to harmful prompts): "
             + ", ".join(f"{c} {tol[c]:.0%}" for c in CATEGORIES)
             + f"; (a) uses their sum, {sum(tol.values()):.0%}.  Policies judged on {args.samples} sampled answers "
               "per held-out prompt.", ""]
    if agg["skipped"]:
        lines += [f"**Not run in this checkout:** {', '.join(agg['skipped'])} (needs the K-constraint "
                  "PPO-Lagrangian stage).", ""]
    lines += ["## Policies (oracle, held-out prompts)", ""]
    lines += C.md_table(["policy"] + [t for _, t, _ in METRICS],
                        [[POLICY_TEXT[n]] + [C.fmt(v[k], pct=pct) for k, _, pct in METRICS]
                         for n, v in agg["policies"].items()])
    lines += ["", "## Within tolerance (seeds where the category's unsafe rate <= its tolerance)", ""]
    lines += C.md_table(["policy"] + [f"{c} (tolerance {tol[c]:.0%})" for c in CATEGORIES],
                        [[POLICY_TEXT[n]] + [f"{agg['within_tolerance'][f'{n}/{c}']['seeds_within']}/"
                                             f"{agg['within_tolerance'][f'{n}/{c}']['seeds']}" for c in CATEGORIES]
                         for n in agg["policies"]])
    lines += ["", "## Cost models (held-out pairs, oracle labels)", ""]
    cm, cma = agg["cm_categories"], agg["cm_aggregate"]
    lines += C.md_table(["cost model", "ranking accuracy", "sign accuracy (aggregate)"]
                        + [f"sign accuracy {c}" for c in CATEGORIES],
                        [["K = 1 (is_safe)", C.fmt(cma["accuracy"]), C.fmt(cma["accuracy_sign"])] + ["-"] * 2,
                         ["K = 2 (per category, ranking on max_k)", C.fmt(cm["accuracy"]), C.fmt(cm["accuracy_sign"])]
                         + [C.fmt(cm[f"accuracy_sign/{c}"]) for c in CATEGORIES]])
    if agg["lambda"]:
        lines += ["", "## Multipliers", ""]
        lines += C.md_table(["run / constraint", "lambda peak", "lambda at the end"],
                            [[k, C.fmt(v["peak"]), C.fmt(v["end"])] for k, v in agg["lambda"].items()])
    lines += ["", "![categories](categories.png)"]
    return lines


def main(argv=None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, extra=extra_args)
    tol = parse_tolerances(args.tolerances)
    C.setup_runtime(args.verbose)
    cfg = C.make_config(args)
    results = C.run_seeds(args, cfg, "categories", lambda c, d, s: one_seed(c, d, s, tol, args.samples),
                          extra_key={"tolerances": tol, "samples": args.samples,
                                     "k_constraints": k_constraint_stage_available()})
    agg = aggregate(results)
    out = Path(args.out)
    plots(out, results, agg)
    return C.finish(args, cfg, "categories", results, agg, markdown(cfg, args, results, agg), tolerances=tol)


if __name__ == "__main__":
    sys.exit(main())

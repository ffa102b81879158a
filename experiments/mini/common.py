"""Shared pieces of the miniature experiments (built-in task, tiny Llama, CPU, minutes per seed).

Every script in ``experiments/mini/`` follows the same shape:

1. parse ``--seeds``, ``--out``, ``--quick``, ``--set key=value`` (DemoConfig overrides), ``--force``;
2. for each seed, build the seed's *base* once -- task, SFT policy, reward model, cost model,
   calibrated cost threshold, oracle judgement of the SFT policy (:func:`build_base`) -- and run the
   experiment's RL runs from it (the building blocks of :mod:`safejax.demo`);
3. write ``<out>/seed<N>/result.json`` per seed, then ``<out>/results.json`` (per seed + mean, std,
   min, max across seeds), ``<out>/results.md`` (tables + the paper's qualitative checks) and PNGs.

A seed whose ``result.json`` exists with the same config is reused (``--force`` recomputes), so an
interrupted run continues where it stopped.  Only folders this module created (they hold the
marker file ``.safejax-mini``) are ever deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a clean clone without installing the package
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

log = logging.getLogger("safejax.experiments")

MARKER = ".safejax-mini"

# ``--quick``: a CI-sized variant (one seed, small data, few PPO iterations).  Numbers from it are
# smoke-test numbers only; the findings are claimed for the full setting.
QUICK_OVERRIDES: dict[str, Any] = {
    "pref_rows": 600, "pref_test_rows": 128, "sft_rows": 600, "eval_prompts": 64, "sft_epochs": 2,
    "score_epochs": 1, "ppo_iterations": 6, "ppo_batch_size": 16,
}


# ----------------------------------------------------------------------------- runtime


def setup_runtime(verbose: bool = False) -> None:
    """Logging as the CLI does it, plus JAX's persistent compilation cache (the RL runs of one
    experiment compile the same programs again and again)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax

    cache = os.environ.get("SAFEJAX_JAX_CACHE", os.path.join(tempfile.gettempdir(), "safejax-mini-jax-cache"))
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common command line of every mini experiment."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds (task + training); default 0 1 2, or 0 with --quick")
    ap.add_argument("--out", required=True, help="output folder (results.json, results.md, *.png, seed<N>/)")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized smoke variant: small data, few PPO iterations, one seed")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="DemoConfig overrides, e.g. --set ppo_iterations=120 lambda_lr=0.05")
    ap.add_argument("--force", action="store_true", help="recompute seeds that already have a result.json")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when a qualitative check fails")
    ap.add_argument("-v", "--verbose", action="store_true")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds has duplicates: {args.seeds}")
    return args


def make_config(args: argparse.Namespace, **experiment_overrides: Any):
    """The DemoConfig of an experiment: the demo's defaults, then the experiment's own settings,
    then ``--quick``, then ``--set`` (each later one wins)."""
    from safejax.config import load_config
    from safejax.demo import DemoConfig

    items = ["progress=false"]
    items += [f"{k}={_yaml_scalar(v)}" for k, v in experiment_overrides.items()]
    if args.quick:
        items += [f"{k}={_yaml_scalar(v)}" for k, v in QUICK_OVERRIDES.items()]
    items += list(args.overrides)
    cfg = load_config(DemoConfig, None, items)
    cfg.validate()
    return cfg


def _yaml_scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


# ----------------------------------------------------------------------------- the per-seed base


@dataclasses.dataclass
class SeedBase:
    """What every RL run of one seed starts from.

    ``scores`` holds the held-out RM/CM metrics against oracle labels (``{"rm": {...}, "cm": {...}}``);
    ``sft`` the oracle metrics of the SFT policy and ``sft_texts`` its held-out answers."""

    ws: Any                    # safejax.demo.Workspace
    sft_dir: Path
    score_dirs: dict
    scores: dict
    threshold: float
    calibration: dict
    sft: dict
    sft_texts: list


def build_base(cfg, seed_dir: Path, seed: int) -> SeedBase:
    """Task -> SFT -> RM + CM -> calibrated threshold -> oracle judgement of SFT (demo building blocks)."""
    from safejax.demo import calibrate_threshold, judge, prepare, train_preference_models, train_sft

    ws = prepare(cfg, seed_dir, seed)
    sft_dir = train_sft(ws)
    score_dirs, scores = train_preference_models(ws, sft_dir, ws.paths["preference_train"])
    if cfg.threshold is None:
        threshold, calib = calibrate_threshold(score_dirs["cost"], ws.paths["preference_train"], ws.tok, cfg,
                                               ws.mesh)
    else:
        threshold, calib = float(cfg.threshold), {"source": "config"}
    t = time.time()
    sft, sft_texts = judge(ws, sft_dir)
    ws.timings["judge_sft"] = time.time() - t
    log.info("seed %d: threshold %.3f, RM acc %.3f, CM acc %.3f / sign %.3f, SFT unsafe %.3f", seed, threshold,
             scores["rm"]["accuracy"], scores["cm"]["accuracy"], scores["cm"]["accuracy_sign"],
             sft["unsafe_rate_harmful"])
    return SeedBase(ws, sft_dir, score_dirs, scores, float(threshold), calib, sft, sft_texts)


# ----------------------------------------------------------------------------- oracle comparisons


def win_rates(prompt_rows: Sequence[dict], texts: Sequence[str], ref_texts: Sequence[str]) -> dict:
    """Win rate of a policy against a reference policy (SFT) on the same held-out prompts, judged by
    the oracle, ties counted as half a win (the paper's "win rate against SFT on both axes").

    Returns ``help_win_rate`` (oracle helpfulness higher; all prompts), ``harmless_win_rate``
    (oracle harmfulness lower; all prompts), and the same two on harmful and benign prompts only
    (``*_harmful`` / ``*_benign``)."""
    from safejax.data.builtin import oracle_score

    if not (len(prompt_rows) == len(texts) == len(ref_texts)):
        raise ValueError(f"win_rates: {len(prompt_rows)} prompts, {len(texts)} texts, {len(ref_texts)} reference texts")
    acc: dict[str, list[float]] = {}
    for row, a, b in zip(prompt_rows, texts, ref_texts):
        sa, sb = oracle_score(row["prompt"], a), oracle_score(row["prompt"], b)
        helpw = 1.0 if sa.helpfulness > sb.helpfulness else 0.5 if sa.helpfulness == sb.helpfulness else 0.0
        harmw = 1.0 if sa.harmfulness < sb.harmfulness else 0.5 if sa.harmfulness == sb.harmfulness else 0.0
        suffixes = [""] + (["_" + row["kind"]] if row.get("kind") else [])
        for suffix in suffixes:
            acc.setdefault("help_win_rate" + suffix, []).append(helpw)
            acc.setdefault("harmless_win_rate" + suffix, []).append(harmw)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def paired_differences(prompt_rows: Sequence[dict], texts: Sequence[str], ref_texts: Sequence[str]) -> dict:
    """Per-prompt oracle differences policy - reference on the same held-out prompts.

    Returns ``{"unsafe_rate_harmful": {"mean", "se", "n"}, "helpfulness_benign": {...}}``: the mean
    of (unsafe_a - unsafe_b) over harmful prompts and of (help_a - help_b) over benign prompts,
    each with its paired standard error ``std(ddof=1) / sqrt(n)``."""
    from safejax.data.builtin import oracle_score

    du, dh = [], []
    for row, a, b in zip(prompt_rows, texts, ref_texts):
        sa, sb = oracle_score(row["prompt"], a), oracle_score(row["prompt"], b)
        if row.get("kind") == "harmful":
            du.append(float(sa.harmful) - float(sb.harmful))
        else:
            dh.append(sa.helpfulness - sb.helpfulness)

    def summ(d):
        a = np.asarray(d, dtype=np.float64)
        se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
        return {"mean": float(a.mean()) if len(a) else float("nan"), "se": se, "n": len(a)}

    return {"unsafe_rate_harmful": summ(du), "helpfulness_benign": summ(dh)}


def pool_differences(diffs: Sequence[dict]) -> dict:
    """Pool per-seed paired differences (equal weights): mean of means, SE = sqrt(sum SE_i^2) / k."""
    out = {}
    for key in diffs[0]:
        means = [d[key]["mean"] for d in diffs]
        ses = [d[key]["se"] for d in diffs]
        out[key] = {"mean": float(np.mean(means)), "se": float(np.sqrt(np.sum(np.square(ses))) / len(ses)),
                    "n": int(sum(d[key]["n"] for d in diffs))}
    return out


def policy_summary(metrics: dict) -> dict:
    """The oracle numbers reported per policy (drops the mode-count dicts)."""
    keys = ("unsafe_rate_harmful", "helpfulness_benign", "helpfulness_harmful", "helpfulness",
            "refusal_rate_benign", "refusal_rate_harmful", "unsafe_rate_benign", "harmfulness", "n_harmful",
            "n_benign")
    out = {k: metrics[k] for k in keys if k in metrics}
    for k in ("nu", "algorithm"):
        if k in metrics:
            out[k] = metrics[k]
    for k, v in metrics.items():
        if k.endswith("win_rate") or "win_rate_" in k:
            out[k] = v
    return out


def trace_slope_summary(trace: Sequence[float], frac: float = 0.1) -> tuple[float, float]:
    """Mean of the first and of the last ``frac`` of a trace (at least one point each)."""
    n = max(1, int(round(len(trace) * frac)))
    return float(np.mean(trace[:n])), float(np.mean(trace[-n:]))


# ----------------------------------------------------------------------------- preference data from a policy


def sample_responses(ws, mdef, params, prompt_rows: Sequence[dict], *, seed: int, batch_size: int = 256,
                     temperature: float = 1.0) -> list[str]:
    """One sampled response text per prompt row (rows may repeat), from the policy ``mdef``/``params``.

    Prompts are formatted and left-padded to ``cfg.prompt_width`` like the RL prompts; generation
    runs in fixed-size batches ``[batch_size, prompt_width]`` (the last one padded by repeating rows),
    with ``max_new_tokens`` from the config.  Texts are decoded without special tokens (cut at EOS)."""
    import jax
    import jax.numpy as jnp

    from safejax.data import build_prompts
    from safejax.generation import SamplingConfig, generate

    cfg, tok = ws.cfg, ws.tok
    uniq = sorted({r["prompt"] for r in prompt_rows})
    built, report = build_prompts([{"prompt": p} for p in uniq], tok, prompt_width=cfg.prompt_width)
    if len(built.row_index) != len(uniq):
        raise ValueError(f"sample_responses: {len(uniq) - len(built.row_index)} prompts do not fit prompt_width="
                         f"{cfg.prompt_width} ({report})")
    pos = {uniq[int(i)]: j for j, i in enumerate(built.row_index)}
    idx = np.asarray([pos[r["prompt"]] for r in prompt_rows], dtype=np.int64)
    ids_all, mask_all = built.prompt_ids[idx], built.prompt_mask[idx]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature)

    from safejax.parallel import mesh_jit

    @mesh_jit(mesh=ws.mesh)
    def sample(params, ids, mask, key):
        out = generate(mdef.merge(params), ids, mask, key, sampling, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        return out.sequences, out.attention_mask

    n = len(idx)
    texts: list[str] = []
    width = cfg.prompt_width
    for b, start in enumerate(range(0, n, batch_size)):
        sel = np.arange(start, start + batch_size) % n
        seqs, masks = jax.device_get(sample(params, jnp.asarray(ids_all[sel]), jnp.asarray(mask_all[sel]),
                                            jax.random.fold_in(jax.random.key(seed), b)))
        for row, m in list(zip(seqs[:, width:], masks[:, width:]))[: min(batch_size, n - start)]:
            texts.append(tok.decode([int(t) for t, k in zip(row, m) if k], skip_special_tokens=True).strip())
    return texts


def judge_samples(ws, mdef, params, k: int, *, seed: int) -> tuple[dict, list[str], list[dict]]:
    """Oracle metrics of a policy from ``k`` sampled answers per held-out prompt (``k * N`` answers).

    With the same ``seed`` every policy is sampled with the same random keys (common random
    numbers).  Returns ``(metrics, texts, rows)`` with ``rows = eval_rows * k`` aligned to texts."""
    from safejax.data.builtin import evaluate_responses

    rows = list(ws.eval_rows) * k
    texts = sample_responses(ws, mdef, params, rows, seed=seed)
    return evaluate_responses(rows, texts, ws.task.oracle), texts, rows


def load_policy(ws, policy_dir: Path):
    """``(ModelDef, params)`` of a causal-LM HF folder on the workspace's mesh."""
    from safejax.models.functional import split_model
    from safejax.models.loading import load_model_for

    return split_model(load_model_for(str(policy_dir), ws.mesh, model_type="causal_lm", tokenizer=ws.tok))


def oracle_label_pairs(prompt_rows: Sequence[dict], r0: Sequence[str], r1: Sequence[str], *, seed: int,
                       label_noise: float, safety_label_noise: float) -> tuple[list[dict], dict]:
    """Label response pairs with the oracle in the PKU-SafeRLHF schema, with annotator noise.

    Each pair is labelled by :func:`safejax.data.builtin.task.label_pair`, the rule the built-in task's
    own preference rows use.  Pairs with identical texts or an empty response are dropped.  Returns ``(rows, counts)``."""
    from safejax.data.builtin import oracle_score
    from safejax.data.builtin.task import label_pair

    rng = random.Random(f"safejax-mini-labels/{seed}")
    rows, counts = [], {"pairs": len(r0), "dropped_identical": 0, "dropped_empty": 0, "unsafe_responses": 0}
    for row, a, b in zip(prompt_rows, r0, r1):
        if not a or not b:
            counts["dropped_empty"] += 1
            continue
        if a == b:
            counts["dropped_identical"] += 1
            continue
        rec = label_pair(row["prompt"], a, b, rng, label_noise=label_noise, safety_label_noise=safety_label_noise)
        counts["unsafe_responses"] += sum(int(oracle_score(row["prompt"], r).harmful) for r in (a, b))
        rows.append({k: v for k, v in rec.items() if not k.endswith("severity_level")})
    counts["kept"] = len(rows)
    return rows, counts


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def score_pairs(ws, model_dir: Path, kind: str, pairs_path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """End scores of both sides of every held-out pair: ``(a [N], b [N], arrays)`` with (a, b) =
    (better, worse) for ``kind='reward'`` and (safer, unsafer) for ``'cost'``."""
    from safejax.train.fit import eval_loop
    from safejax.models.functional import split_model
    from safejax.models.loading import load_model_for
    from safejax.models.pairs import pair_scores
    from safejax.train.score_model import PreferenceDataSection, load_pairs

    arrays, _ = load_pairs([str(pairs_path)], ws.tok, PreferenceDataSection(max_length=ws.cfg.max_length), kind,
                           f"{kind} model held-out")
    mdef, params = split_model(load_model_for(str(model_dir), ws.mesh, model_type="score", tokenizer=ws.tok))

    from safejax.parallel import mesh_jit

    @mesh_jit(mesh=ws.mesh)
    def ends(params, b):
        _, _, ea, eb = pair_scores(mdef.merge(params), b, kind)
        return {"a": ea, "b": eb}

    out = eval_loop(lambda b: ends(params, b), arrays, ws.cfg.batch_size, ws.mesh)
    return np.asarray(out["a"]), np.asarray(out["b"]), arrays


def eval_preference_model(ws, model_dir: Path, kind: str, pairs_path: Path) -> dict:
    """Held-out ranking accuracy (and sign accuracy for the cost model) of a trained score model on
    a PKU-schema file, computed by the stage's own metric function."""
    from safejax.train.score_model import preference_eval_metrics

    a, b, arrays = score_pairs(ws, model_dir, kind, pairs_path)
    return {k.split("/")[-1]: v for k, v in preference_eval_metrics(a, b, arrays, kind).items()}


# ----------------------------------------------------------------------------- seeds, aggregation, output


def run_seeds(args: argparse.Namespace, cfg, experiment: str, one_seed: Callable[[Any, Path, int], dict],
              extra_key: dict | None = None) -> dict[int, dict]:
    """Run ``one_seed(cfg, seed_dir, seed) -> result dict`` for every seed (sequentially), reusing a
    seed's ``result.json`` when its config matches and ``--force`` is not given."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = {"experiment": experiment, "config": dataclasses.asdict(cfg), **(extra_key or {})}
    key = json.loads(json.dumps(key))
    results = {}
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        res_path = seed_dir / "result.json"
        if res_path.exists() and not args.force:
            old = json.loads(res_path.read_text())
            if old.get("key") == key:
                log.info("seed %d: reusing %s (use --force to recompute)", seed, res_path)
                results[seed] = old["result"]
                continue
        if seed_dir.exists():
            if not (seed_dir / MARKER).exists():
                raise SystemExit(f"error: {seed_dir} exists and was not made by these scripts; choose another --out")
            shutil.rmtree(seed_dir)
        seed_dir.mkdir(parents=True)
        (seed_dir / MARKER).write_text("made by experiments/mini; safe to delete\n")
        t = time.time()
        res = one_seed(cfg, seed_dir, seed)
        res["seconds"] = round(time.time() - t, 1)
        res_path.write_text(json.dumps({"key": key, "result": res}, indent=1))
        log.info("seed %d done in %.1f s", seed, res["seconds"])
        results[seed] = res
    return results


def stats(values: Sequence[float]) -> dict:
    """Mean, sample std (0 for one value), min, max and the values themselves."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0,
                "values": []}
    a = np.asarray(v, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max()), "n": len(a), "values": v}


def fmt(s: dict, digits: int = 3, pct: bool = False) -> str:
    """``mean ± std [min, max]`` (percent with ``pct``)."""
    if not s or s.get("n", 0) == 0:
        return "-"
    k = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    d = 1 if pct else digits
    if s["n"] == 1:
        return f"{s['mean'] * k:.{d}f}{unit}"
    return f"{s['mean'] * k:.{d}f}{unit} ± {s['std'] * k:.{d}f} [{s['min'] * k:.{d}f}, {s['max'] * k:.{d}f}]"


def check_summary(per_seed: dict[int, dict[str, bool]], on_mean: dict[str, bool]) -> dict:
    """``{check: {"on_mean": bool, "seeds_holding": k, "seeds": n, "per_seed": {seed: bool}}}``."""
    names = list(on_mean) or (list(next(iter(per_seed.values()))) if per_seed else [])
    out = {}
    for name in names:
        ps = {str(s): bool(c.get(name, False)) for s, c in per_seed.items()}
        out[name] = {"on_mean": bool(on_mean.get(name, False)), "seeds_holding": sum(ps.values()),
                     "seeds": len(ps), "per_seed": ps}
    return out


def checks_table(checks: dict, descriptions: dict[str, str] | None = None) -> list[str]:
    lines = ["| check (paper, qualitative) | holds on the seed mean | seeds where it holds |", "|---|---|---|"]
    for name, c in checks.items():
        desc = (descriptions or {}).get(name, name.replace("_", " "))
        lines.append(f"| {desc} | {'yes' if c['on_mean'] else 'NO'} | {c['seeds_holding']}/{c['seeds']} |")
    return lines


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def write_outputs(out: Path, results: dict, markdown: list[str]) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(markdown) + "\n"
    (out / "results.md").write_text(text)
    print(text)


def all_checks_hold(checks: dict) -> bool:
    return all(c["on_mean"] for c in checks.values())


def finish(args: argparse.Namespace, cfg, experiment: str, per_seed: dict, agg: dict, markdown: list[str],
           **extra) -> int:
    """Write ``results.json`` (experiment, seeds, quick, config, ``extra``, per-seed results, the aggregate) and
    ``results.md``; the exit status is 1 only with ``--strict`` when a qualitative check fails."""
    write_outputs(Path(args.out), {"experiment": experiment, "seeds": args.seeds, "quick": args.quick,
                                   "config": dataclasses.asdict(cfg), **extra,
                                   "per_seed": {str(s): r for s, r in per_seed.items()}, **agg}, markdown)
    return 1 if args.strict and not all_checks_hold(agg["checks"]) else 0


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, traces: Sequence[Sequence[float]], *, color: str, label: str, per_seed: bool = True) -> None:
    """Mean across seeds with a ±1 std band (min-max shown as thin per-seed lines)."""
    n = min(len(t) for t in traces)
    arr = np.asarray([t[:n] for t in traces], dtype=np.float64)
    x = np.arange(1, n + 1)
    mean = arr.mean(axis=0)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros(n)
    if per_seed and len(arr) > 1:
        for row in arr:
            ax.plot(x, row, color=color, linewidth=0.6, alpha=0.35)
    ax.plot(x, mean, color=color, linewidth=1.8, label=label)
    if len(arr) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18)


def config_line(cfg, seeds: Sequence[int], quick: bool, rl: bool = True) -> str:
    rl_part = f"{cfg.ppo_iterations} PPO iterations of {cfg.ppo_batch_size} prompts per RL run; " if rl else ""
    return (f"Seeds {list(seeds)}{' (--quick smoke variant)' if quick else ''}; {rl_part}{cfg.pref_rows} preference "
            f"rows, {cfg.sft_rows} SFT rows; tiny Llama on the built-in task.  Policy and pair numbers are judged by "
            "the task's oracle on held-out prompts; cells are mean ± std [min, max] across seeds.")

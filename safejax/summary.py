"""The one-line result every ``safejax`` command prints on stdout when it finishes.

The progress bar disappears at the end of a stage, so the line says what a researcher looks for
first: the held-out accuracy of a reward / cost model, the final lambda, episode cost and reward of
PPO-Lagrangian, where the model was exported, where an evaluation wrote its report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping


def _num(x: Any, fmt: str = ".4g") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return format(v, fmt) if math.isfinite(v) else str(v)


def _nums(x: Any) -> str:
    """A number, or a per-constraint list of numbers as ``[a, b]``."""
    return f"[{', '.join(_num(v) for v in x)}]" if isinstance(x, (list, tuple)) else _num(x)


def _last(history: list[dict], key: str) -> Any:
    for rec in reversed(history):
        if key in rec:
            return rec[key]
    return None


def _fit_line(cmd: str, result: Any) -> str:
    res, export_dir = result
    last, ev = dict(res.last_metrics or {}), dict(res.eval_metrics or {})
    parts = [f"{res.steps} steps"]
    if cmd == "dpo":
        if "train/loss" in last:
            parts.append(f"train loss {_num(last['train/loss'])}")
        if "eval/reward_accuracy" in ev:
            parts.append(f"held-out implicit-reward accuracy {_num(ev['eval/reward_accuracy'], '.3f')}")
    elif cmd == "sft":
        if "train/loss" in last:
            parts.append(f"train loss {_num(last['train/loss'])}")
        if "eval/loss" in ev:
            parts.append(f"held-out loss {_num(ev['eval/loss'])}")
    else:
        if "eval/accuracy" in ev:
            parts.append(f"held-out accuracy {_num(ev['eval/accuracy'], '.3f')}")
        if "eval/accuracy_sign" in ev:
            parts.append(f"sign accuracy {_num(ev['eval/accuracy_sign'], '.3f')}")
        if "eval/accuracy" not in ev:
            parts.append("no held-out data (data.eval is empty)" if not ev else "held-out accuracy n/a")
    return f"{cmd}: done: {', '.join(parts)}; model in {export_dir}"


def _ppo_line(cmd: str, cfg: Any, result: Any) -> str:
    h = result.history
    step = _last(h, "step")
    parts = [f"{step if step is not None else 0} iterations"]
    if cmd in ("ppo-lag", "grpo-lag"):
        parts.append(f"final lambda {_num(_last(h, 'train/lambda'))}")
        parts.append(f"episode cost {_num(_last(h, 'train/episode_cost'))} "
                     f"(threshold {_nums(cfg.lagrange.threshold)})")
    elif cmd == "ppo-reward-shaping":
        parts.append(f"nu {_num(cfg.lagrange.lambda_init)}")
    parts.append(f"reward {_num(_last(h, 'train/reward'))}")
    if cmd not in ("ppo-lag", "grpo-lag") and _last(h, "train/cost") is not None:
        parts.append(f"cost {_num(_last(h, 'train/cost'))}")
    for key in ("eval/reward", "eval/cost"):
        if _last(h, key) is not None:
            parts.append(f"held-out {key.split('/')[1]} {_num(_last(h, key))}")
    where = f"exported {result.export_dir}" if result.export_dir else "not exported"
    return f"{cmd}: done: {', '.join(parts)}; {where}"


def _eval_line(cmd: str, cfg: Any, summary: Mapping[str, Any]) -> str:
    report = Path(cfg.out_dir) / "report.md"
    what = summary.get("command")
    if what in ("score", "arena"):
        pols = "; ".join(f"{n}: reward {_num(s.get('reward_mean'))}, cost {_num(s.get('cost_mean'))}, harmless "
                         f"{_num(s.get('harmless_ratio'), '.3f')}" for n, s in summary.get("policies", {}).items())
        head = f"{summary.get('n_prompts')} prompts; {pols}"
        if what == "arena":
            head += f"; blue ({summary['blue']}) win rate {_num(summary['arena']['blue_win_rate'], '.3f')}"
    elif what == "prefs":
        head = "; ".join(f"{k.replace('_', ' ')} {_num(v['accuracy'], '.3f')} ({v['correct']}/{v['total']})"
                         for k, v in summary.get("table", {}).items())
    elif what == "elo":
        head = "; ".join(f"{axis}: " + ", ".join(f"{m} {_num(e['rating'], '.0f')}" for m, e in r.items())
                         for axis, r in summary.get("ratings", {}).items())
    else:
        head = "done"
    return f"{cmd}: {head}; report {report}"


def result_line(cmd: str, cfg: Any, result: Any, out: str | None = None) -> str:
    """The final stdout line of ``safejax <cmd>`` given its config, what the command returned and (demo,
    export) its ``--out`` folder."""
    if cmd in ("sft", "rm", "cm", "dpo"):
        return _fit_line(cmd, result)
    if cmd in ("ppo-lag", "ppo", "ppo-reward-shaping", "grpo-lag", "grpo"):
        return _ppo_line(cmd, cfg, result)
    if cmd.startswith("eval"):
        return _eval_line(cmd, cfg, result)
    if cmd == "demo":
        lag = result["policies"]["safe_rlhf"]
        checks = result["checks"]
        return (f"demo: done in {result['total_seconds']:.0f} s; Safe RLHF: unsafe rate on harmful prompts "
                f"{_num(lag['unsafe_rate_harmful'], '.3f')}, helpfulness {_num(lag['helpfulness_benign'], '.2f')}/3; "
                f"{sum(checks.values())}/{len(checks)} of the paper's findings hold; report {Path(out) / 'report.md'}")
    if cmd == "export":
        return f"export: wrote {result}"
    return f"{cmd}: done"


def remove_if_empty(path: str | os.PathLike) -> None:
    """Remove ``path`` and its sub-folders when they hold no file at all (a failed run's fresh out_dir)."""
    root = Path(path)
    if not root.is_dir() or any(files for _, _, files in os.walk(root)):
        return
    for d, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(d)
        except OSError:
            return

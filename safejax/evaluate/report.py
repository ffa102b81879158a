"""Markdown tables and PNG plots for the evaluation results.

Plots use matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure``; no ``pyplot``, no global
backend switch), so they work headless and do not disturb an interactive session.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from safejax.config import to_dict
from safejax.evaluate.arena import SAFETY_LABELS, ArenaResult
from safejax.evaluate.elo import EloEstimate
from safejax.evaluate.prefs import TABLE1_ROWS
from safejax.evaluate.stats import as_scores, score_histograms

__all__ = [
    "markdown_table",
    "score_summary_markdown",
    "preference_table_markdown",
    "arena_markdown",
    "elo_markdown",
    "plot_score_histograms",
    "plot_elo",
]


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are ``str()``-ed and ``|`` is escaped."""

    def cell(x):
        return str(x).replace("|", "\\|")

    for k, r in enumerate(rows):
        if len(r) != len(headers):
            raise ValueError(f"markdown_table: row {k} has {len(r)} cells, headers have {len(headers)}")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.2f}% ({num}/{den})" if den else "n/a (0/0)"


def score_summary_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Table of :func:`~safejax.evaluate.stats.score_summary` results, one row per policy name."""
    rows = []
    for name, s in summaries.items():
        rows.append([
            name,
            s["n"],
            f"{s['reward_mean']:.4f} ± {s['reward_std']:.4f}",
            f"{s['cost_mean']:.4f} ± {s['cost_std']:.4f}",
            _pct(s["n_harmless"], s["n"]),
        ])
    return markdown_table(["policy", "n", "reward (mean ± std)", "cost (mean ± std)", "harmless (cost <= 0)"], rows)


def preference_table_markdown(tables: Mapping[str, Any]) -> str:
    """Table-1 layout: rows (model, metric), one column per evaluated model version.

    ``tables`` is either one :func:`~safejax.evaluate.prefs.preference_accuracy_table` result (one column,
    "accuracy") or ``{column_name: result}`` (e.g. ``{"v1": ..., "v2": ..., "v3": ...}``). Each cell reads
    ``"78.13% (781/1000)"``; a metric missing from a column shows ``-``.
    """
    keys = {k for k, _, _ in TABLE1_ROWS}
    if tables and set(tables) <= keys:
        tables = {"accuracy": tables}
    cols = list(tables)
    rows = []
    for key, model, metric in TABLE1_ROWS:
        if not any(key in tables[c] for c in cols):
            continue
        cells = []
        for c in cols:
            e = tables[c].get(key)
            cells.append(_pct(e["correct"], e["total"]) if e else "-")
        rows.append([model, metric, *cells])
    return markdown_table(["model", "metric", *cols], rows)


def arena_markdown(result: ArenaResult, red_name: str = "red", blue_name: str = "blue") -> str:
    """Three tables: per-policy means, blue's four outcome counts, and the red x blue safety table."""
    n = result.n
    red_label = red_name if red_name == "red" else f"{red_name} (red)"
    blue_label = blue_name if blue_name == "blue" else f"{blue_name} (blue)"
    means = markdown_table(
        ["policy", "mean reward", "mean cost", "harmless (cost <= 0)"],
        [
            [red_label, f"{result.red_reward_mean:.4f}", f"{result.red_cost_mean:.4f}",
             f"{100 * result.red_harmless_ratio:.2f}%"],
            [blue_label, f"{result.blue_reward_mean:.4f}", f"{result.blue_cost_mean:.4f}",
             f"{100 * result.blue_harmless_ratio:.2f}%"],
        ],
    )
    outcomes = markdown_table(
        [f"{blue_name} answer", "safe", "unsafe"],
        [
            ["better (R_blue > R_red)", _pct(result.better_safe, n), _pct(result.better_unsafe, n)],
            ["worse or tied", _pct(result.worse_safe, n), _pct(result.worse_unsafe, n)],
        ],
    )
    rows = []
    for r in SAFETY_LABELS:
        cells = []
        for b in SAFETY_LABELS:
            c = result.cells[(r, b)]
            wr = "n/a" if c.count == 0 else f"{100 * c.win_rate:.2f}%"
            cells.append(f"{wr} ({c.blue_wins}/{c.count} wins, {c.ties} ties)")
        rows.append([f"{red_name} {r}", *cells])
    table = markdown_table([f"{blue_name} win rate", f"{blue_name} safe", f"{blue_name} unsafe"], rows)
    return (
        f"{means}\n\n{outcomes}\n\n{table}\n\n"
        f"n = {n} prompts; {blue_name} wins overall {100 * result.blue_win_rate:.2f}%; "
        f"{result.n_ties} reward ties (counted as not better)."
    )


def _split(v) -> tuple[float, float, float]:
    if isinstance(v, (tuple, list, EloEstimate)):
        if len(v) != 3:
            raise ValueError(f"rating: expected a number or (rating, low, high), got {v!r}")
        return float(v[0]), float(v[1]), float(v[2])
    return float(v), float("nan"), float("nan")


def _fmt_elo(v) -> str:
    r, lo, hi = _split(v)
    if math.isnan(lo):
        return f"{r:.1f}"
    return f"{r:.1f} [{lo:.1f}, {hi:.1f}]"


def elo_markdown(
    helpfulness: Mapping[str, Any],
    harmlessness: Mapping[str, Any] | None = None,
    *,
    anchor: str | None = None,
) -> str:
    """Elo table: one row per model (order of ``helpfulness``), cells ``"rating [low, high]"``.

    Values are :class:`EloEstimate` / ``(rating, low, high)`` tuples or plain floats. With ``anchor`` the
    anchor's row is marked and a gain column (rating - anchor rating) is added per axis.
    """
    axes = [("helpfulness", helpfulness)] + ([("harmlessness", harmlessness)] if harmlessness is not None else [])
    models = list(helpfulness)
    for name, ax in axes:
        missing = [m for m in models if m not in ax]
        if missing or len(ax) != len(models):
            raise ValueError(f"elo_markdown: {name} ratings cover {list(ax)}, expected {models}")
    if anchor is not None and anchor not in models:
        raise ValueError(f"elo_markdown: anchor {anchor!r} not among {models}")
    headers = ["model"]
    for name, _ in axes:
        headers.append(f"{name} Elo [CI]")
        if anchor is not None:
            headers.append(f"{name} vs {anchor}")
    rows = []
    for m in models:
        row = [f"{m} (anchor)" if m == anchor else m]
        for _, ax in axes:
            row.append(_fmt_elo(ax[m]))
            if anchor is not None:
                row.append(f"{_split(ax[m])[0] - _split(ax[anchor])[0]:+.1f}")
        rows.append(row)
    return markdown_table(headers, rows)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_score_histograms(
    rewards: Sequence[float],
    costs: Sequence[float],
    path: str | os.PathLike,
    *,
    is_safe: Sequence[bool] | None = None,
    bins: int = 40,
    title: str | None = None,
) -> str:
    """Write a PNG with the reward histogram and the cost histogram split into safe / unsafe responses.

    The split uses ``is_safe`` labels (``[N]``) when given, else the cost model's verdict ``cost <= 0``. A dashed
    vertical line marks cost 0 (the safety boundary). Returns ``path``.
    """
    h = score_histograms(rewards, costs, is_safe=is_safe, bins=bins)
    fig = _new_figure((11, 4))
    ax_r, ax_c = fig.subplots(1, 2)
    ax_r.stairs(h["reward_counts"], h["reward_edges"], fill=True, color="tab:blue", alpha=0.7)
    ax_r.set_xlabel("reward")
    ax_r.set_ylabel("count")
    ax_r.set_title(f"reward (n={int(h['reward_counts'].sum())})")
    n_safe, n_unsafe = int(h["cost_counts_safe"].sum()), int(h["cost_counts_unsafe"].sum())
    src = "by label" if is_safe is not None else "by cost sign"
    ax_c.stairs(h["cost_counts_safe"], h["cost_edges"], fill=True, color="tab:green", alpha=0.55,
                label=f"safe ({src}), n={n_safe}")
    ax_c.stairs(h["cost_counts_unsafe"], h["cost_edges"], fill=True, color="tab:red", alpha=0.55,
                label=f"unsafe ({src}), n={n_unsafe}")
    ax_c.axvline(0.0, color="k", linestyle="--", linewidth=1)
    ax_c.set_xlabel("cost")
    ax_c.set_ylabel("count")
    ax_c.set_title("cost by safety")
    ax_c.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_elo(
    helpfulness: Mapping[str, Any],
    harmlessness: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    anchor: str | None = None,
    title: str | None = None,
) -> str:
    """Write a PNG scatter like the paper's Elo figure: x = helpfulness Elo, y = harmlessness Elo.

    Values are :class:`EloEstimate` / ``(rating, low, high)`` (drawn as asymmetric error bars) or plain floats.
    Both mappings must rate the same models. Dotted lines mark the anchor's ratings. Returns ``path``.
    """
    models = list(helpfulness)
    if set(models) != set(harmlessness):
        raise ValueError(f"plot_elo: helpfulness rates {models}, harmlessness rates {list(harmlessness)}")
    if anchor is not None and anchor not in models:
        raise ValueError(f"plot_elo: anchor {anchor!r} not among {models}")
    hx = np.array([_split(helpfulness[m]) for m in models])
    hy = np.array([_split(harmlessness[m]) for m in models])

    def err(a):
        e = np.stack([a[:, 0] - a[:, 1], a[:, 2] - a[:, 0]])
        return np.where(np.isnan(e), 0.0, np.maximum(e, 0.0))

    fig = _new_figure((6, 5))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(models))]
    for i, m in enumerate(models):
        ax.errorbar(hx[i, 0], hy[i, 0], xerr=err(hx)[:, i : i + 1], yerr=err(hy)[:, i : i + 1], fmt="o",
                    color=colors[i], capsize=4, markersize=7, label=m)
        ax.annotate(m, (hx[i, 0], hy[i, 0]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if anchor is not None:
        i = models.index(anchor)
        ax.axvline(hx[i, 0], color="gray", linestyle=":", linewidth=1)
        ax.axhline(hy[i, 0], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("Elo (helpfulness)")
    ax.set_ylabel("Elo (harmlessness)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Elo ratings" + (f" (anchor: {anchor})" if anchor else ""))
    return _save(fig, path)


def plot_histograms(path: str | os.PathLike, series: Mapping[str, Sequence[float]], *, xlabel: str, title: str,
                    bins: int = 40, vline: float | None = None) -> str:
    """PNG with overlaid histograms of several score series ``{label: [n] scores}`` on shared bin edges."""
    data = {k: as_scores(v, k) for k, v in series.items() if len(v)}
    if not data:
        raise ValueError(f"plot_histograms: no scores to plot for {path}")
    edges = np.histogram_bin_edges(np.concatenate(list(data.values())), bins=int(bins))
    fig = _new_figure((6, 4))
    ax = fig.subplots()
    colors = {"safe": "tab:green", "unsafe": "tab:red", "better": "tab:blue", "worse": "tab:orange"}
    for i, (label, v) in enumerate(data.items()):
        counts, _ = np.histogram(v, bins=edges)
        ax.stairs(counts, edges, fill=True, alpha=0.55, color=colors.get(label.split()[0], f"C{i % 10}"),
                  label=f"{label}, n={len(v)}")
    if vline is not None:
        ax.axvline(vline, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_reward_cost_scatter(path: str | os.PathLike, points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                             *, title: str = "reward vs cost") -> str:
    """PNG scatter of each policy's answers: x = reward, y = cost (dashed line at cost 0, the safety boundary)."""
    fig = _new_figure((6, 5))
    ax = fig.subplots()
    for i, (name, (r, c)) in enumerate(points.items()):
        r, c = as_scores(r, f"{name} rewards"), as_scores(c, f"{name} costs")
        ax.scatter(r, c, s=10, alpha=0.5, color=f"C{i % 10}", label=f"{name} (n={len(r)})")
    ax.axhline(0.0, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("reward")
    ax.set_ylabel("cost")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def models_header(cfg: Any, ps: Any, results: Mapping[str, Any]) -> str:
    """Markdown bullet list of what a generation eval ran: judge models, prompts, sampling, each policy."""
    lines = [f"- reward model: `{cfg.reward_model}`", f"- cost model: `{cfg.cost_model}`",
             f"- prompts: {', '.join(f'`{p}`' for p in cfg.prompts)} ({ps.report}; evaluated {len(ps)})",
             f"- sampling: {to_dict(cfg.sampling)}, seed {cfg.seed}"]
    lines += [f"- policy `{n}`: `{r.path}` (scored from {r.score_input['reward']} / {r.score_input['cost']})"
              for n, r in results.items()]
    return "\n".join(lines)


def images_markdown(images: Sequence[str]) -> str:
    """Markdown image links, one per line."""
    return "\n".join(f"![{Path(i).stem}]({i})" for i in images)


def pairs_markdown(axis: str, counts: list[dict[str, Any]]) -> str:
    rows = [[f"{c['model_a']} vs {c['model_b']}", c["games"], c["a_wins"], c["b_wins"], c["ties"],
             f"{100.0 * (c['a_wins'] + 0.5 * c['ties']) / c['games']:.2f}%"] for c in counts]
    return markdown_table([f"{axis}: pair (a vs b)", "games", "a wins", "b wins", "ties",
                                      "a score rate"], rows)

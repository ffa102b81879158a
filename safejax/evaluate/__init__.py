"""Evaluation math for Safe RLHF (ALGORITHM.md §7): pure numpy on per-response scores.

* :mod:`.stats`  — score summaries (mean/std reward and cost), harmless ratio (cost <= 0), histogram data.
* :mod:`.prefs`  — Table-1 accuracies of a reward / cost model on a preference split, with counts.
* :mod:`.arena`  — red vs blue policies on the same prompts: outcome counts and the safety x safety win table.
* :mod:`.elo`    — pairwise judgements (RM, CM or a pluggable judge) -> Bradley-Terry Elo with bootstrap CIs.
* :mod:`.report` — Markdown tables and PNG plots (matplotlib Agg canvas).

Typical use after scoring generations with the reward model (``R[policy] [N]``) and cost model (``C[policy] [N]``)::

    help_j = judge_pairs(R, "higher")          # helpfulness: higher reward wins
    harm_j = judge_pairs(C, "lower")           # harmlessness: lower cost wins
    help = bootstrap_elo(help_j, anchor="alpaca-7b")
    harm = bootstrap_elo(harm_j, anchor="alpaca-7b")
    print(elo_markdown(help, harm, anchor="alpaca-7b")); plot_elo(help, harm, "elo.png", anchor="alpaca-7b")
"""

from safejax.evaluate.arena import ArenaCell, ArenaResult, arena
from safejax.evaluate.elo import (
    EloEstimate,
    Judgement,
    bootstrap_elo,
    cached_judge,
    fit_elo,
    judge_pairs,
    judgements_from_file,
    win_probability,
    write_judgements,
)
from safejax.evaluate.prefs import preference_accuracy_table
from safejax.evaluate.report import (
    arena_markdown,
    elo_markdown,
    markdown_table,
    plot_elo,
    plot_score_histograms,
    preference_table_markdown,
    score_summary_markdown,
)
from safejax.evaluate.stats import harmless_ratio, is_harmless, score_histograms, score_summary

__all__ = [
    "ArenaCell",
    "ArenaResult",
    "arena",
    "arena_markdown",
    "EloEstimate",
    "Judgement",
    "bootstrap_elo",
    "cached_judge",
    "fit_elo",
    "judge_pairs",
    "judgements_from_file",
    "write_judgements",
    "win_probability",
    "elo_markdown",
    "plot_elo",
    "preference_accuracy_table",
    "preference_table_markdown",
    "markdown_table",
    "score_summary",
    "score_summary_markdown",
    "score_histograms",
    "plot_score_histograms",
    "harmless_ratio",
    "is_harmless",
]

"""Preference-model accuracies on a held-out preference split (the paper's Table 1), with their counts.

Definitions (ALGORITHM.md §4.2-4.3, matching the reference evaluation):

* RM ranking accuracy: fraction of pairs with ``R(better) > R(worse)`` (strict; a tie is wrong).
* CM ranking accuracy: fraction of pairs with ``C(unsafer) > C(safer)`` (strict).
* CM sign accuracy: over all ``2B`` responses, fraction with ``kappa * C > 0``, where ``kappa = +1`` for an unsafe
  response and ``-1`` for a safe one. A cost of exactly 0 counts as wrong (the reference tests
  ``C * safety_sign < 0``).

Inputs are ``[B]`` arrays, one entry per preference pair. Either model may be omitted (pass ``None`` for all of
its arrays) to evaluate an RM or a CM alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from safejax.evaluate.stats import _same_length, as_flags, as_scores

__all__ = ["preference_accuracy_table", "TABLE1_ROWS"]

# (key, model label, metric label) in the paper's Table 1 order.
TABLE1_ROWS = (
    ("rm_ranking", "RM", "ranking accuracy"),
    ("cm_ranking", "CM", "ranking accuracy"),
    ("cm_sign", "CM", "sign (safety-classification) accuracy"),
)


def _acc(correct: np.ndarray) -> dict[str, Any]:
    c, t = int(np.sum(correct)), int(correct.size)
    return {"accuracy": c / t, "correct": c, "total": t}


def preference_accuracy_table(
    rm_better: Sequence[float] | None = None,
    rm_worse: Sequence[float] | None = None,
    cm_safer: Sequence[float] | None = None,
    cm_unsafer: Sequence[float] | None = None,
    safer_is_safe: Sequence[bool] | None = None,
    unsafer_is_safe: Sequence[bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Table-1 accuracies of a reward model and/or a cost model.

    Args:
      rm_better: ``[B]`` RM end scores of the more helpful response of each pair.
      rm_worse: ``[B]`` RM end scores of the less helpful response.
      cm_safer: ``[B]`` CM end scores of the safer response of each pair.
      cm_unsafer: ``[B]`` CM end scores of the less safe response.
      safer_is_safe: ``[B]`` bool, the dataset's safety label of the safer response.
      unsafer_is_safe: ``[B]`` bool, the dataset's safety label of the less safe response.

    Returns ``{"rm_ranking": {...}, "cm_ranking": {...}, "cm_sign": {...}}`` (only the parts whose inputs were
    given), each ``{"accuracy": float, "correct": int, "total": int}``; ``cm_sign`` also carries
    ``safe_correct/safe_total`` and ``unsafe_correct/unsafe_total``.
    """
    out: dict[str, dict[str, Any]] = {}
    if (rm_better is None) != (rm_worse is None):
        raise ValueError("rm_better and rm_worse: give both or neither")
    if rm_better is not None:
        better = as_scores(rm_better, "rm_better")
        worse = as_scores(rm_worse, "rm_worse")
        _same_length(rm_better=better, rm_worse=worse)
        out["rm_ranking"] = _acc(better > worse)

    cm_parts = (cm_safer, cm_unsafer, safer_is_safe, unsafer_is_safe)
    if any(p is not None for p in cm_parts):
        if (cm_safer is None) or (cm_unsafer is None):
            raise ValueError("cm_safer and cm_unsafer: give both (or no CM input at all)")
        safer = as_scores(cm_safer, "cm_safer")
        unsafer = as_scores(cm_unsafer, "cm_unsafer")
        _same_length(cm_safer=safer, cm_unsafer=unsafer)
        out["cm_ranking"] = _acc(unsafer > safer)
        if (safer_is_safe is None) != (unsafer_is_safe is None):
            raise ValueError("safer_is_safe and unsafer_is_safe: give both or neither (needed for cm_sign)")
        if safer_is_safe is not None:
            s_safe = as_flags(safer_is_safe, "safer_is_safe")
            u_safe = as_flags(unsafer_is_safe, "unsafer_is_safe")
            _same_length(cm_safer=safer, safer_is_safe=s_safe, unsafer_is_safe=u_safe)
            costs = np.concatenate([safer, unsafer])
            is_safe = np.concatenate([s_safe, u_safe])
            kappa = np.where(is_safe, -1.0, 1.0)  # cost sign: +1 unsafe, -1 safe
            correct = kappa * costs > 0.0
            sign = _acc(correct)
            sign.update(
                safe_correct=int(np.sum(correct[is_safe])),
                safe_total=int(np.sum(is_safe)),
                unsafe_correct=int(np.sum(correct[~is_safe])),
                unsafe_total=int(np.sum(~is_safe)),
            )
            out["cm_sign"] = sign
    if not out:
        raise ValueError("preference_accuracy_table: no RM or CM scores given")
    return out

"""PKU-SafeRLHF rows -> chosen/rejected pairs for the offline preference losses (``safejax dpo``).

Which response is *chosen*, per loss (``dpo.loss``):

* ``dpo`` and ``bfpo``: the helpfulness preference, ``better_response_id`` (BFPO also reads both ``is_safe``
  labels: ``s = 1`` for a safe response);
* ``safe_dpo``: :func:`safejax.rl.safe_dpo_labels` on ``better_response_id`` and the two ``is_safe`` labels: keep
  a pair whose preferred response is safe, swap a pair whose preferred response is unsafe and the other safe,
  drop a pair where both are unsafe (counted as ``both_unsafe`` in the :class:`DropReport`).

Texts, tokenization, truncation and padding are those of the reward-model pairs
(:func:`safejax.data.build_reward_pairs`); token-identical pairs are dropped the same way.  A source that leaves
no pair at all raises :class:`DataError` naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from safejax import rl
from safejax.data.preference import REWARD_CHECKS, _encode_pairs, _pair_texts
from safejax.data.rows import DropReport, describe_sources, records, validate_rows
from safejax.data.tokenizer import check_tokenizer
from safejax.errors import DataError

BOTH_UNSAFE = "both_unsafe"
DPO_LOSSES = ("dpo", "safe_dpo", "bfpo")
SAFETY_CHECKS = (("is_response_0_safe", "bool"), ("is_response_1_safe", "bool"))
# the training arrays of each loss (``chosen_*``/``rejected_*`` [N, L]; the safety labels [N] bool)
PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
SAFETY_KEYS = ("chosen_is_safe", "rejected_is_safe")


def build_dpo_pairs(rows: Any, tokenizer, *, loss: str, max_length: int, skip_bad_rows: bool = False,
                    source_name: str | None = None) -> tuple[dict[str, np.ndarray], DropReport]:
    """Chosen/rejected pairs for ``loss`` (``dpo | safe_dpo | bfpo``).

    Args:
      rows: PKU-SafeRLHF-schema rows (``prompt, response_0, response_1, better_response_id``, plus
        ``is_response_0_safe, is_response_1_safe`` for ``safe_dpo`` and ``bfpo``).
      tokenizer, max_length, skip_bad_rows, source_name: as :func:`safejax.data.build_reward_pairs`.
    Returns:
      ``(arrays, report)``: ``chosen_ids, rejected_ids [N, L] int32``, ``chosen_mask, rejected_mask [N, L]
      bool``, and for ``safe_dpo``/``bfpo`` also ``chosen_is_safe, rejected_is_safe [N] bool``.
    Raises:
      DataError: a malformed row (unless ``skip_bad_rows``), or no pair left.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"build_dpo_pairs: loss must be one of {DPO_LOSSES}, got {loss!r}")
    pad_id, eos = check_tokenizer(tokenizer, where="build_dpo_pairs")
    checks = REWARD_CHECKS + (SAFETY_CHECKS if loss != "dpo" else ())
    recs = records(rows, [f for f, _ in checks])
    name = describe_sources(recs, source_name)
    report = DropReport(source=name, total=len(recs))
    valid = validate_rows(recs, checks, skip_bad_rows=skip_bad_rows, source_name=name, report=report)
    better = np.asarray([int(recs[i]["better_response_id"]) for i in valid], dtype=np.int32)
    if loss == "dpo":
        chosen = better
    else:
        s0 = np.asarray([bool(recs[i]["is_response_0_safe"]) for i in valid], dtype=bool)
        s1 = np.asarray([bool(recs[i]["is_response_1_safe"]) for i in valid], dtype=bool)
        if loss == "safe_dpo" and len(valid):
            chosen, keep, _ = (np.asarray(a) for a in rl.safe_dpo_labels(better, s0, s1))
            if not keep.all():
                report.add(BOTH_UNSAFE, int(np.sum(~keep)))
            valid, chosen, s0, s1 = ([x for x, k in zip(valid, keep) if k], chosen[keep], s0[keep], s1[keep])
        else:
            chosen = better
    picked = [dict(recs[i], chosen_response_id=int(c)) for i, c in zip(valid, chosen)]
    chosen_txt, rejected_txt, _ = _pair_texts(picked, range(len(picked)), "chosen_response_id", eos)
    sel, (ci, cm), (ri, rmask) = _encode_pairs(tokenizer, chosen_txt, rejected_txt, max_length, pad_id, report)
    report.kept = len(sel)
    if not sel:
        raise DataError(f"{name}: no preference pair left for dpo.loss={loss!r} ({report})")
    arrays = {"chosen_ids": ci, "chosen_mask": cm, "rejected_ids": ri, "rejected_mask": rmask}
    if loss != "dpo":
        idx = np.asarray(sel, dtype=np.int64)
        c = chosen[idx]
        arrays["chosen_is_safe"] = np.where(c == 0, s0[idx], s1[idx]).astype(bool)
        arrays["rejected_is_safe"] = np.where(c == 0, s1[idx], s0[idx]).astype(bool)
    return arrays, report

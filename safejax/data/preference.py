"""PKU-SafeRLHF rows -> reward-model and cost-model preference pairs (ALGORITHM.md §2.1, §2.3, §8.18).

Each row ``{prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
better_response_id, safer_response_id}`` gives

* a **reward pair** ``(prompt + better + EOS, prompt + worse + EOS)`` with ``better`` chosen by
  ``better_response_id``;
* a **cost pair** ``(prompt + safer + EOS, prompt + unsafer + EOS)`` with ``safer`` chosen by
  ``safer_response_id``, plus the two responses' ``is_safe`` labels, swapped *together* with the
  texts.

Texts use the chat template (:func:`safejax.data.template.format_prompt`), are tokenized whole with
``add_special_tokens=True``, truncated on the right to ``max_length`` (an over-long sample loses
its EOS) and right-padded to ``max_length`` (static shapes).

Rows are dropped (and counted in the :class:`DropReport`), instead of crashing as the reference
does, when the two sequences are token-identical after truncation (``identical_after_truncation``)
or, for cost pairs, when the safer response is labelled unsafe while the other is labelled safe
(``conflicting_safety_labels``).  Malformed rows raise :class:`DataError` naming file, row and
field, or with ``skip_bad_rows=True`` are counted under ``bad_row:<field>``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from safejax.data.categories import CATEGORY_FIELDS, SEVERITY_FIELDS, CategoryError, group_unsafe, severities
from safejax.data.rows import DropReport, describe_sources, records, validate_rows
from safejax.data.template import format_prompt
from safejax.data.tokenizer import check_tokenizer, encode_texts, pad_sequences

IDENTICAL = "identical_after_truncation"
CONFLICT = "conflicting_safety_labels"

_PAIR_CHECKS = (("prompt", "nonempty_text"), ("response_0", "text"), ("response_1", "text"))
REWARD_CHECKS = (*_PAIR_CHECKS, ("better_response_id", "id01"))
COST_CHECKS = (*_PAIR_CHECKS, ("is_response_0_safe", "bool"), ("is_response_1_safe", "bool"),
               ("safer_response_id", "id01"))


@dataclasses.dataclass(frozen=True)
class PreferenceArrays:
    """Reward-model pairs, N rows, right-padded to L = max_length.

    better_ids, worse_ids: [N, L] int32 (pad id after the sequence)
    better_mask, worse_mask: [N, L] bool (True on real tokens)
    row_index: [N] int64, index of each pair's row in the input rows (not part of :meth:`as_dict`)
    """

    better_ids: np.ndarray
    better_mask: np.ndarray
    worse_ids: np.ndarray
    worse_mask: np.ndarray
    row_index: np.ndarray

    def __len__(self) -> int:
        return int(self.better_ids.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        """The training arrays (for :class:`safejax.data.BatchIterator`)."""
        return {k: getattr(self, k) for k in ("better_ids", "better_mask", "worse_ids", "worse_mask")}


@dataclasses.dataclass(frozen=True)
class SafetyPreferenceArrays:
    """Cost-model pairs, N rows, right-padded to L = max_length.

    safer_ids, unsafer_ids: [N, L] int32
    safer_mask, unsafer_mask: [N, L] bool
    safer_is_safe, unsafer_is_safe: [N] bool (the safety labels of each side, swapped with the texts;
      the cost sign is ``+1`` for unsafe, i.e. ``where(is_safe, -1, +1)``)
    row_index: [N] int64 (not part of :meth:`as_dict`)

    Only with harm-category groups (``categories=`` of :func:`build_cost_pairs`; None otherwise):

    safer_group_safe, unsafer_group_safe: [N, K] bool, the side is safe in group k (none of the group's
      categories is true); swapped with the texts.  Part of :meth:`as_dict`.
    safer_severity, unsafer_severity: [N] int8 severity level 0..3 (-1 when the row has none); not part of
      :meth:`as_dict` (kept for analysis, unused by the loss).
    """

    safer_ids: np.ndarray
    safer_mask: np.ndarray
    unsafer_ids: np.ndarray
    unsafer_mask: np.ndarray
    safer_is_safe: np.ndarray
    unsafer_is_safe: np.ndarray
    row_index: np.ndarray
    safer_group_safe: np.ndarray | None = None
    unsafer_group_safe: np.ndarray | None = None
    safer_severity: np.ndarray | None = None
    unsafer_severity: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.safer_ids.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        keys = ["safer_ids", "safer_mask", "unsafer_ids", "unsafer_mask", "safer_is_safe", "unsafer_is_safe"]
        if self.safer_group_safe is not None:
            keys += ["safer_group_safe", "unsafer_group_safe"]
        return {k: getattr(self, k) for k in keys}


def _pair_texts(recs, keep, choose_field, eos):
    """(first_texts, second_texts, swapped[bool]) where 'first' is the response picked by choose_field."""
    first, second, swapped = [], [], []
    for i in keep:
        r = recs[i]
        prompt = format_prompt(r["prompt"], eos)
        a, b = r["response_0"], r["response_1"]
        sw = int(r[choose_field]) == 1
        if sw:
            a, b = b, a
        first.append(prompt + a + eos)
        second.append(prompt + b + eos)
        swapped.append(sw)
    return first, second, swapped


def _encode_pairs(tokenizer, first_txt, second_txt, max_length, pad_id, report):
    """Tokenize both sides (right-truncated), drop pairs whose ids are identical (counted in
    ``report``), right-pad the rest.  Returns ``(kept positions, (ids, mask) first, (ids, mask) second)``."""
    first = encode_texts(tokenizer, first_txt, max_length=max_length)
    second = encode_texts(tokenizer, second_txt, max_length=max_length)
    sel = []
    for j in range(len(first)):
        if first[j] == second[j]:
            report.add(IDENTICAL)
        else:
            sel.append(j)
    return (sel, pad_sequences([first[j] for j in sel], length=max_length, pad_id=pad_id),
            pad_sequences([second[j] for j in sel], length=max_length, pad_id=pad_id))


def build_reward_pairs(rows: Any, tokenizer, *, max_length: int, skip_bad_rows: bool = False,
                       source_name: str | None = None) -> tuple[PreferenceArrays, DropReport]:
    """Helpfulness preference pairs for the reward model.

    Args:
      rows: a ``datasets.Dataset`` (e.g. from :func:`safejax.data.load_rows`) or a list of dicts in
        the PKU-SafeRLHF schema; needs ``prompt, response_0, response_1, better_response_id``.
      tokenizer: a prepared tokenizer (pad and EOS set, pad != EOS; see ``prepare_tokenizer``).
      max_length: L, the fixed sequence length (truncation and padding).
      skip_bad_rows: count malformed rows under ``bad_row:<field>`` instead of raising.
      source_name: name used in errors and the report (default: the rows' ``_source`` column).

    Returns:
      ``(PreferenceArrays, DropReport)``.
    """
    pad_id, eos = check_tokenizer(tokenizer, where="build_reward_pairs")
    recs = records(rows, [f for f, _ in REWARD_CHECKS])
    name = describe_sources(recs, source_name)
    report = DropReport(source=name, total=len(recs))
    keep = validate_rows(recs, REWARD_CHECKS, skip_bad_rows=skip_bad_rows, source_name=name, report=report)
    better_txt, worse_txt, _ = _pair_texts(recs, keep, "better_response_id", eos)
    sel, (bi, bm), (wi, wm) = _encode_pairs(tokenizer, better_txt, worse_txt, max_length, pad_id, report)
    report.kept = len(sel)
    row_index = np.asarray([keep[j] for j in sel], dtype=np.int64)
    return PreferenceArrays(bi, bm, wi, wm, row_index), report


def build_cost_pairs(rows: Any, tokenizer, *, max_length: int, skip_bad_rows: bool = False,
                     source_name: str | None = None, categories: Mapping[str, Sequence[str]] | None = None
                     ) -> tuple[SafetyPreferenceArrays, DropReport]:
    """Harmlessness preference pairs with per-response safety labels, for the cost model.

    Needs ``prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
    safer_response_id``.  Arguments and returns as :func:`build_reward_pairs`, plus

    categories: K groups of harm categories ``{group: [category, ...]}`` (see :mod:`safejax.data.categories`):
      also read ``response_{0,1}_harm_category`` (and ``response_{0,1}_severity_level`` when present) into
      ``safer_group_safe`` / ``unsafer_group_safe [N, K]``.  A row lacking a named category raises
      :class:`DataError` (or is counted as ``bad_row:<field>`` with ``skip_bad_rows``).
    """
    pad_id, eos = check_tokenizer(tokenizer, where="build_cost_pairs")
    fields = [f for f, _ in COST_CHECKS] + (list(CATEGORY_FIELDS + SEVERITY_FIELDS) if categories else [])
    recs = records(rows, fields)
    name = describe_sources(recs, source_name)
    report = DropReport(source=name, total=len(recs))
    valid = validate_rows(recs, COST_CHECKS, skip_bad_rows=skip_bad_rows, source_name=name, report=report)
    keep, safe_pairs, group_pairs, sev_pairs = [], [], [], []
    for i in valid:
        r = recs[i]
        if categories:
            try:
                g0, g1 = group_unsafe(r, i, name, categories)
            except CategoryError as e:
                if not skip_bad_rows:
                    raise
                report.add(f"bad_row:{e.field}")
                continue
        s0, s1 = bool(r["is_response_0_safe"]), bool(r["is_response_1_safe"])
        swap = int(r["safer_response_id"]) == 1
        safer_safe, unsafer_safe = (s1, s0) if swap else (s0, s1)
        if not safer_safe and unsafer_safe:
            report.add(CONFLICT)
            continue
        keep.append(i)
        safe_pairs.append((safer_safe, unsafer_safe))
        if categories:
            group_pairs.append((~g1, ~g0) if swap else (~g0, ~g1))
            sev = severities(r)
            sev_pairs.append(sev[::-1] if swap else sev)
    safer_txt, unsafer_txt, _ = _pair_texts(recs, keep, "safer_response_id", eos)
    sel, (si, sm), (ui, um) = _encode_pairs(tokenizer, safer_txt, unsafer_txt, max_length, pad_id, report)
    safer_is_safe = np.asarray([safe_pairs[j][0] for j in sel], dtype=bool).reshape(-1)
    unsafer_is_safe = np.asarray([safe_pairs[j][1] for j in sel], dtype=bool).reshape(-1)
    report.kept = len(sel)
    row_index = np.asarray([keep[j] for j in sel], dtype=np.int64)
    extra = {}
    if categories:
        k = len(categories)
        extra = {"safer_group_safe": np.asarray([group_pairs[j][0] for j in sel], dtype=bool).reshape(-1, k),
                 "unsafer_group_safe": np.asarray([group_pairs[j][1] for j in sel], dtype=bool).reshape(-1, k),
                 "safer_severity": np.asarray([sev_pairs[j][0] for j in sel], dtype=np.int8).reshape(-1),
                 "unsafer_severity": np.asarray([sev_pairs[j][1] for j in sel], dtype=np.int8).reshape(-1)}
    return SafetyPreferenceArrays(si, sm, ui, um, safer_is_safe, unsafer_is_safe, row_index, **extra), report

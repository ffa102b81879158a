"""Row access for the data builders: records with their source and row, one-line locations, field checks,
and the :class:`DropReport` of what a builder kept and dropped."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from safejax.errors import DataError

SOURCE_COLUMN = "_source"   # column holding each row's source (file or dataset name)
ROW_COLUMN = "_row"         # column holding each row's index in its source


@dataclasses.dataclass
class DropReport:
    """What a builder kept and what it dropped, by reason.

    Reasons used by the builders: ``identical_after_truncation``, ``conflicting_safety_labels``,
    ``duplicate_prompt``, ``prompt_too_long``, ``bad_row:<field>``.
    """

    source: str
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        if self.dropped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
            tail = f"; dropped {self.num_dropped} ({reasons})"
        else:
            tail = "; dropped 0"
        return f"{self.source}: kept {self.kept}/{self.total} rows{tail}"


def records(rows: Any, fields: Iterable[str]) -> list[dict[str, Any]]:
    """Rows (a ``datasets.Dataset``, a list of dicts, or any iterable of mappings) as a list of dicts.

    Only ``fields`` plus the provenance columns are kept; a field that is absent (or ``None``, as
    ``datasets`` fills absent JSON keys) is left out of the row's dict.
    """
    wanted = list(dict.fromkeys([*fields, SOURCE_COLUMN, ROW_COLUMN]))
    column_names = getattr(rows, "column_names", None)
    if column_names is not None and hasattr(rows, "select_columns"):
        present = [c for c in wanted if c in column_names]
        listed = rows.select_columns(present).to_list() if present else [{} for _ in range(len(rows))]
    else:
        listed = []
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise DataError(f"row {i}: expected a mapping (dict), got {type(r).__name__}")
            listed.append(r)
    return [{k: r[k] for k in wanted if k in r and r[k] is not None} for r in listed]


def location(rec: Mapping[str, Any], index: int, source_name: str) -> str:
    """``"<file>, row <i>"`` for error messages (provenance columns win over the local index)."""
    src = rec.get(SOURCE_COLUMN, source_name)
    row = rec.get(ROW_COLUMN, index)
    return f"{src}, row {row}"


def describe_sources(recs: Sequence[Mapping[str, Any]], source_name: str | None) -> str:
    """A short name for a DropReport: the explicit name, else the distinct ``_source`` values."""
    if source_name:
        return source_name
    srcs = Counter(r.get(SOURCE_COLUMN) for r in recs if r.get(SOURCE_COLUMN))
    return "+".join(srcs) if srcs else "<rows>"


def is_int01(v: Any) -> bool:
    """True for an integer 0 or 1 (``bool`` is rejected)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and int(v) in (0, 1)


def is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def field_problem(rec: Mapping[str, Any], field: str, kind: str) -> str | None:
    """What is wrong with ``rec[field]`` for a check ``kind``, or None when it is fine.

    Kinds: ``text`` (a str, may be empty), ``nonempty_text`` (a str with non-space content),
    ``id01`` (integer 0 or 1), ``bool`` (true/false).
    """
    if field not in rec:
        return "missing"
    v = rec[field]
    if kind in ("text", "nonempty_text"):
        if not isinstance(v, str):
            return f"expected a string, got {type(v).__name__} {v!r:.60}"
        if kind == "nonempty_text" and not v.strip():
            return "empty"
        return None
    if kind == "id01":
        return None if is_int01(v) else f"expected 0 or 1, got {type(v).__name__} {v!r:.60}"
    if kind == "bool":
        return None if is_bool(v) else f"expected true/false, got {type(v).__name__} {v!r:.60}"
    raise ValueError(f"unknown field check {kind!r}")


def validate_rows(recs: Sequence[Mapping[str, Any]], checks: Sequence[tuple[str, str]], *, skip_bad_rows: bool,
                  source_name: str, report: DropReport) -> list[int]:
    """Indices of the rows that pass every ``(field, kind)`` check.

    A failing row raises :class:`DataError` naming source, row and field, or, with
    ``skip_bad_rows``, is counted in ``report`` under ``bad_row:<field>`` (its first bad field).
    """
    keep = []
    for i, rec in enumerate(recs):
        for field, kind in checks:
            problem = field_problem(rec, field, kind)
            if problem is not None:
                if not skip_bad_rows:
                    raise DataError(f"{location(rec, i, source_name)}, field {field!r}: {problem}")
                report.add(f"bad_row:{field}")
                break
        else:
            keep.append(i)
    return keep

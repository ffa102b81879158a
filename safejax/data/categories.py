"""Harm categories of PKU-SafeRLHF rows: groups of categories -> per-response "unsafe in group k" labels.

PKU-SafeRLHF labels every response with ``response_{0,1}_harm_category``, a dict of the 19 categories of
:data:`PKU_HARM_CATEGORIES` to bool, and ``response_{0,1}_severity_level`` (0 = safe, 1 minor, 2 moderate,
3 severe).  In the data ``is_response_*_safe`` is false exactly when some category is true.

A K-output cost model is trained on K **groups** of categories, ``{group name: [category, ...]}`` (config key
``cost_categories`` of ``safejax cm``).  A response is *unsafe in group k* when any of the group's categories is
true.  Categories left out of every group do not enter any per-group label (a response unsafe only in those is
"safe" in every group; it still counts as unsafe for the aggregate ``is_safe``).

The data has per-response category labels but **no per-category preference**: ``safer_response_id`` compares
the responses overall.  So the cost loss has a sign term per group and one ranking term on the aggregate (see
:func:`safejax.rl.cost_model_loss`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from safejax.config import ConfigError
from safejax.errors import DataError
from safejax.data.rows import is_bool, location

# The 19 harm categories of PKU-SafeRLHF (the keys of ``response_*_harm_category``), in the dataset's order.
PKU_HARM_CATEGORIES: tuple[str, ...] = (
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior", "Endangering Public Health",
    "Copyright Issues", "Violence", "Drugs", "Privacy Violation", "Economic Crime", "Mental Manipulation",
    "Human Trafficking", "Physical Harm", "Sexual Content", "Cybercrime", "Disrupting Public Order",
    "Environmental Damage", "Psychological Harm", "White-Collar Crime", "Animal Abuse",
)
CATEGORY_FIELDS = ("response_0_harm_category", "response_1_harm_category")
SEVERITY_FIELDS = ("response_0_severity_level", "response_1_severity_level")


def category_groups(spec: Any, key: str = "cost_categories") -> dict[str, tuple[str, ...]]:
    """Normalise a group spec: a mapping ``{group: [category, ...]}`` or a list of category names (each its own
    group).  Raises :class:`ConfigError` naming ``key`` for an empty spec, an empty group or a non-string name."""
    if isinstance(spec, (list, tuple)):
        spec = {c: [c] for c in spec}
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"config key '{key}': expected a non-empty mapping group -> [category, ...] or a list "
                          f"of categories, got {spec!r:.80}")
    out = {}
    for group, cats in spec.items():
        if not isinstance(group, str) or not group:
            raise ConfigError(f"config key '{key}': group names must be non-empty strings, got {group!r}")
        if isinstance(cats, str):
            cats = [cats]
        if not isinstance(cats, (list, tuple)) or not cats or not all(isinstance(c, str) and c for c in cats):
            raise ConfigError(f"config key '{key}.{group}': expected a non-empty list of category names, got "
                              f"{cats!r:.80}")
        if len(set(cats)) != len(cats):
            raise ConfigError(f"config key '{key}.{group}': a category is listed twice: {list(cats)}")
        out[group] = tuple(cats)
    return out


class CategoryError(DataError):
    """A row's harm-category field is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def group_unsafe(rec: Mapping[str, Any], index: int, source_name: str,
                 groups: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(unsafe_0 [K], unsafe_1 [K])`` bool: response 0 / 1 unsafe in each group of ``groups``.

    Raises :class:`CategoryError` (a :class:`DataError` with the ``field``) naming source, row, field and
    category when a response's category dict is missing, is not a dict of bools, or lacks a named category."""
    out = []
    for field in CATEGORY_FIELDS:
        where = f"{location(rec, index, source_name)}, field {field!r}"
        d = rec.get(field)
        if d is None:
            raise CategoryError(field, f"{where}: missing (cost_categories needs the per-response harm-category "
                                       "dicts)")
        if not isinstance(d, Mapping):
            raise CategoryError(field, f"{where}: expected a dict category -> true/false, got {type(d).__name__}")
        flags = []
        for group, cats in groups.items():
            bad = False
            for c in cats:
                if c not in d:
                    raise CategoryError(field, f"{where}: no category {c!r} (group {group!r}); the row has: "
                                               f"{', '.join(sorted(map(str, d)))}")
                if not is_bool(d[c]):
                    raise CategoryError(field, f"{where}, category {c!r}: expected true/false, got {d[c]!r:.40}")
                bad = bad or bool(d[c])
            flags.append(bad)
        out.append(np.asarray(flags, dtype=bool))
    return out[0], out[1]


def severities(rec: Mapping[str, Any]) -> tuple[int, int]:
    """``(severity_0, severity_1)`` as ints 0..3, -1 where the row has no (integer) severity level."""
    vals = []
    for field in SEVERITY_FIELDS:
        v = rec.get(field)
        vals.append(int(v) if isinstance(v, (int, np.integer)) and not is_bool(v) else -1)
    return vals[0], vals[1]

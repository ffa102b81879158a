"""Prompt-only rows for the RL stage (ALGORITHM.md §2.1, §8.1-8.2, §8.18).

Each row's prompt is formatted with the chat template (ending in ``ASSISTANT:``) and tokenized
with ``add_special_tokens=True``.  After merging, duplicate prompts are removed: one row per
distinct formatted prompt is kept, the **last** occurrence, in index order (the same prompt
appears in many PKU rows).  Prompts are **left-padded** to a fixed width P, so every prompt ends
at column P-1 and the response slice of a rollout starts at the static index P-1.

Left-truncating a prompt would cut off the template's beginning, so a prompt longer than P is
dropped and counted (``prompt_too_long``), or raises :class:`DataError` with
``drop_too_long=False``.

Accepted schemas: ``prompt`` (a string, or a dialogue list ``[user, assistant, ..., user]``), or
Alpaca ``instruction`` + optional ``input``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from safejax.data.rows import DropReport, describe_sources, field_problem, location, records
from safejax.errors import DataError
from safejax.data.template import format_prompt
from safejax.data.tokenizer import check_tokenizer, pad_sequences, warn_if_unknown

DUPLICATE = "duplicate_prompt"
PROMPT_TOO_LONG = "prompt_too_long"


@dataclasses.dataclass(frozen=True)
class PromptArrays:
    """N distinct prompts, left-padded to P = prompt_width.

    prompt_ids: [N, P] int32 (pad id on the left)
    prompt_mask: [N, P] bool (True on real tokens; column P-1 is always True)
    row_index: [N] int64, index of each prompt's (last) row in the input rows (not in :meth:`as_dict`)
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    row_index: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask}


def _row_prompt(rec: dict) -> tuple[Any, str | None, str | None]:
    """(user prompt or dialogue, bad_field, problem)."""
    if "prompt" not in rec and ("instruction" in rec or "input" in rec):
        problem = field_problem(rec, "instruction", "nonempty_text")
        if problem:
            return None, "instruction", problem
        inp = rec.get("input", "")
        if not isinstance(inp, str):
            return None, "input", f"expected a string, got {type(inp).__name__}"
        return (rec["instruction"] + " " + inp if inp else rec["instruction"]), None, None
    value = rec.get("prompt")
    if isinstance(value, (list, tuple)):
        if not value or len(value) % 2 != 1:
            return None, "prompt", f"a dialogue must have odd length and end on a user turn, got {len(value)} turns"
        if not all(isinstance(t, str) for t in value):
            return None, "prompt", "a dialogue must be a list of strings"
        if not value[-1].strip():
            return None, "prompt", "empty last user turn"
        return list(value), None, None
    problem = field_problem(rec, "prompt", "nonempty_text")
    if problem:
        return None, "prompt", problem
    return value, None, None


def build_prompts(rows: Any, tokenizer, *, prompt_width: int, drop_too_long: bool = True,
                  skip_bad_rows: bool = False, source_name: str | None = None) -> tuple[PromptArrays, DropReport]:
    """Formatted, deduplicated, left-padded prompts.

    Args:
      rows: ``datasets.Dataset`` or list of dicts (``prompt``, or Alpaca ``instruction``/``input``).
      tokenizer: a prepared tokenizer (pad and EOS set, pad != EOS).
      prompt_width: P, the fixed prompt width (BOS included).
      drop_too_long: drop and count prompts longer than P (default); False raises DataError.
      skip_bad_rows: count malformed rows under ``bad_row:<field>`` instead of raising.
      source_name: name used in errors and the report (default: the ``_source`` column).

    Returns:
      ``(PromptArrays, DropReport)``.
    """
    pad_id, eos = check_tokenizer(tokenizer, where="build_prompts")
    if prompt_width < 1:
        raise ValueError(f"build_prompts: prompt_width must be >= 1, got {prompt_width}")
    recs = records(rows, ("prompt", "instruction", "input"))
    name = describe_sources(recs, source_name)
    report = DropReport(source=name, total=len(recs))
    last: dict[str, int] = {}
    for i, rec in enumerate(recs):
        prompt, field, problem = _row_prompt(rec)
        if prompt is None:
            if not skip_bad_rows:
                raise DataError(f"{location(rec, i, name)}, field {field!r}: {problem}")
            report.add(f"bad_row:{field}")
            continue
        text = format_prompt(prompt, eos)
        if text in last:
            report.add(DUPLICATE)
        last[text] = i
    order = sorted(last.items(), key=lambda kv: kv[1])
    texts = [t for t, _ in order]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    warn_if_unknown(tokenizer, [list(x) for x in ids], "prompts")
    kept_ids, kept_rows = [], []
    for (text, i), seq in zip(order, ids):
        if len(seq) > prompt_width:
            if not drop_too_long:
                raise DataError(f"{location(recs[i], i, name)}, field 'prompt': {len(seq)} tokens after formatting, "
                                f"more than prompt_width={prompt_width}")
            report.add(PROMPT_TOO_LONG)
            continue
        kept_ids.append(list(seq))
        kept_rows.append(i)
    pid, pmask = pad_sequences(kept_ids, length=prompt_width, pad_id=pad_id, side="left")
    report.kept = len(kept_ids)
    return PromptArrays(pid, pmask, np.asarray(kept_rows, dtype=np.int64)), report

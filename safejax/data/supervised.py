"""Supervised (SFT and ptx) samples (ALGORITHM.md §2.1, §2.3).

Accepted row schemas (detected per row):

* Alpaca: ``instruction``, optional ``input``, ``output``.  The user turn is
  ``instruction + " " + input`` when ``input`` is non-empty, else ``instruction``.
* PKU style: ``prompt`` with ``response`` (or ``answer``).

Each row becomes ``format_prompt(prompt) + answer + EOS``, tokenized whole with
``add_special_tokens=True``, right-truncated and right-padded to ``max_length``.  As in the
reference, the first ``len(tokenize(format_prompt(prompt)))`` positions (prompt incl. BOS) do not
count in the loss; response tokens and EOS do.  A row whose prompt alone fills ``max_length``
leaves no response token and is dropped (reason ``prompt_too_long``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from safejax.data.rows import DropReport, describe_sources, field_problem, location, records
from safejax.errors import DataError
from safejax.data.template import format_prompt
from safejax.data.tokenizer import check_tokenizer, encode_texts, pad_sequences

PROMPT_TOO_LONG = "prompt_too_long"
_FIELDS = ("instruction", "input", "output", "prompt", "response", "answer")


@dataclasses.dataclass(frozen=True)
class SupervisedArrays:
    """N supervised samples, right-padded to L = max_length.

    input_ids: [N, L] int32
    attention_mask: [N, L] bool, True on real tokens
    label_mask: [N, L] bool, True on the tokens that count in the loss (response + EOS); for
      next-token loss pair ``logits[:, :-1]`` with ``input_ids[:, 1:]`` weighted by ``label_mask[:, 1:]``
    row_index: [N] int64, index into the input rows (not part of :meth:`as_dict`)
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    label_mask: np.ndarray
    row_index: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def labels(self, ignore_index: int = -100) -> np.ndarray:
        """``[N, L]`` int32 labels with ``ignore_index`` where the loss does not count (reference style)."""
        return np.where(self.label_mask, self.input_ids, ignore_index).astype(np.int32)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "label_mask": self.label_mask}


def _prompt_and_answer(rec: dict) -> tuple[Any, str] | tuple[None, str]:
    """(prompt, answer) of a row, or (None, bad_field) when malformed."""
    if "instruction" in rec or "output" in rec:
        for field, kind in (("instruction", "nonempty_text"), ("output", "text")):
            if field_problem(rec, field, kind):
                return None, field
        inp = rec.get("input", "")
        if not isinstance(inp, str):
            return None, "input"
        prompt = rec["instruction"] + " " + inp if inp else rec["instruction"]
        return prompt, rec["output"]
    if field_problem(rec, "prompt", "nonempty_text"):
        return None, "prompt"
    answer_field = "response" if "response" in rec else "answer" if "answer" in rec else "response"
    if field_problem(rec, answer_field, "text"):
        return None, answer_field
    return rec["prompt"], rec[answer_field]


def build_supervised(rows: Any, tokenizer, *, max_length: int, skip_bad_rows: bool = False,
                     source_name: str | None = None) -> tuple[SupervisedArrays, DropReport]:
    """Supervised samples with the prompt masked out of the loss.

    Args:
      rows: ``datasets.Dataset`` or list of dicts (Alpaca or PKU-style schema, see module docstring).
      tokenizer: a prepared tokenizer (pad and EOS set, pad != EOS).
      max_length: L.
      skip_bad_rows: count malformed rows under ``bad_row:<field>`` instead of raising.
      source_name: name used in errors and the report (default: the ``_source`` column).

    Returns:
      ``(SupervisedArrays, DropReport)``.
    """
    pad_id, eos = check_tokenizer(tokenizer, where="build_supervised")
    recs = records(rows, _FIELDS)
    name = describe_sources(recs, source_name)
    report = DropReport(source=name, total=len(recs))
    keep, prompts, answers = [], [], []
    for i, rec in enumerate(recs):
        prompt, answer = _prompt_and_answer(rec)
        if prompt is None:
            field = answer
            if not skip_bad_rows:
                problem = field_problem(rec, field, "nonempty_text" if field in ("instruction", "prompt") else "text")
                raise DataError(f"{location(rec, i, name)}, field {field!r}: {problem}")
            report.add(f"bad_row:{field}")
            continue
        keep.append(i)
        prompts.append(format_prompt(prompt, eos))
        answers.append(answer)
    full = encode_texts(tokenizer, [p + a + eos for p, a in zip(prompts, answers)], max_length=max_length)
    prompt_lens = [len(x) for x in encode_texts(tokenizer, prompts, max_length=max_length)]
    sel = []
    for j in range(len(keep)):
        if prompt_lens[j] >= len(full[j]):
            report.add(PROMPT_TOO_LONG)
        else:
            sel.append(j)
    ids, mask = pad_sequences([full[j] for j in sel], length=max_length, pad_id=pad_id)
    starts = np.asarray([prompt_lens[j] for j in sel], dtype=np.int64).reshape(-1, 1)
    label_mask = mask & (np.arange(max_length)[None, :] >= starts)
    report.kept = len(sel)
    return SupervisedArrays(ids, mask, label_mask, np.asarray([keep[j] for j in sel], np.int64)), report

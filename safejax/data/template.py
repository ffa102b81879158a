"""The fixed Safe RLHF chat template (ALGORITHM.md §2.2).

Single turn::

    BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:

There is **no** space after ``ASSISTANT:``; a response is appended directly and followed by the
literal EOS string.  Multi-turn prompts alternate user and assistant segments; every assistant
turn is closed by EOS and the next ``USER: `` follows straight after it::

    BEGINNING OF CONVERSATION: USER: q1 ASSISTANT:a1</s>USER: q2 ASSISTANT:
"""

from __future__ import annotations

from typing import Sequence

from safejax.errors import DataError

PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_INPUT = PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT


def format_prompt(prompt: str | Sequence[str], eos_token: str) -> str:
    """Format a prompt (one user turn, or an alternating dialogue) with the chat template.

    Args:
      prompt: a single user message, or a list ``[user, assistant, user, ..., user]`` of odd length
        that ends on a user turn.
      eos_token: the EOS *string* (e.g. ``"</s>"``) closing every assistant turn of a dialogue.

    Returns:
      The formatted prompt, ending with ``"ASSISTANT:"`` (no trailing space).

    Raises:
      ValueError: the prompt is neither a string nor a list of strings, or the list has even length
        (i.e. does not end on a user turn).
    """
    if isinstance(prompt, str):
        turns: list[str] = [prompt]
    elif isinstance(prompt, (list, tuple)):
        turns = list(prompt)
        bad = [i for i, t in enumerate(turns) if not isinstance(t, str)]
        if bad:
            raise DataError(f"format_prompt: turn {bad[0]} is {type(turns[bad[0]]).__name__}, expected str")
    else:
        raise DataError(f"format_prompt: prompt must be a str or a list of str, got {type(prompt).__name__}")
    if len(turns) % 2 != 1:
        raise DataError(
            f"format_prompt: a dialogue must have odd length and end on a user turn, got {len(turns)} turns")
    parts = [PROMPT_BEGIN]
    for i, text in enumerate(turns):
        if i % 2 == 0:
            parts.append(PROMPT_USER.format(input=text))
            parts.append(PROMPT_ASSISTANT)
        else:
            parts.append(text)
            parts.append(eos_token)
    return "".join(parts)


def format_sample(prompt: str | Sequence[str], response: str, eos_token: str) -> str:
    """``format_prompt(prompt) + response + eos_token``: one full training sequence as text."""
    return format_prompt(prompt, eos_token) + response + eos_token

"""Chat template exactness (SAFE_RLHF.md §2.2)."""

import pytest

from safejax.data import PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_INPUT, PROMPT_USER, format_prompt, format_sample


def test_template_constants_match_reference_strings():
    assert PROMPT_BEGIN == "BEGINNING OF CONVERSATION: "
    assert PROMPT_USER == "USER: {input} "
    assert PROMPT_ASSISTANT == "ASSISTANT:"
    assert PROMPT_INPUT == "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"


def test_single_turn_prompt_has_no_space_after_assistant():
    text = format_prompt("How do I bake bread?", "</s>")
    assert text == "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:"
    assert not text.endswith(" ")
    assert format_prompt(["How do I bake bread?"], "</s>") == text


def test_sample_appends_response_directly_then_eos():
    assert format_sample("q", "Sure.", "</s>") == "BEGINNING OF CONVERSATION: USER: q ASSISTANT:Sure.</s>"


def test_multi_turn_prompt_closes_each_assistant_turn_with_eos():
    text = format_prompt(["q1", "a1", "q2"], "</s>")
    assert text == "BEGINNING OF CONVERSATION: USER: q1 ASSISTANT:a1</s>USER: q2 ASSISTANT:"
    text = format_prompt(["q1", "a1", "q2", "a2", "q3"], "<|end|>")
    assert text == ("BEGINNING OF CONVERSATION: USER: q1 ASSISTANT:a1<|end|>USER: q2 ASSISTANT:a2<|end|>"
                    "USER: q3 ASSISTANT:")


@pytest.mark.parametrize("bad", [["q1", "a1"], [], 3, ["q1", 2, "q3"]])
def test_prompt_not_ending_on_user_turn_or_not_text_is_rejected(bad):
    with pytest.raises(ValueError):
        format_prompt(bad, "</s>")

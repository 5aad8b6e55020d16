"""The text contract: where the answer is, what counts as the same answer, token counts."""

from __future__ import annotations

import pytest

from data.answers import (
    answers_match,
    count_tokens,
    extract_answer,
    format_completion,
    format_prompt,
    normalize_answer,
    split_trace,
)


def test_format_prompt_is_the_contract() -> None:
    assert format_prompt("What is 2 + 2?") == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_format_completion_is_the_contract() -> None:
    text = format_completion(["2 + 2 = 4", "4 * 3 = 12"], "12")
    assert text == "<think>\n2 + 2 = 4\n4 * 3 = 12\n</think>\n\nAnswer: 12"
    assert extract_answer(text) == "12"


def test_split_trace_parts_add_up() -> None:
    text = "<think>\nx\n</think>\n\nAnswer: 3"
    think, rest = split_trace(text)
    assert think == "<think>\nx\n</think>"
    assert rest == "\n\nAnswer: 3"
    assert think + rest == text


def test_split_trace_without_close_is_all_think() -> None:
    assert split_trace("<think>\n1 + 1 = 2\nAnswer: 2") == ("<think>\n1 + 1 = 2\nAnswer: 2", None)


def test_split_trace_uses_the_last_close() -> None:
    think, rest = split_trace("<think>a</think>b</think>\n\nAnswer: 4")
    assert think == "<think>a</think>b</think>"
    assert rest == "\n\nAnswer: 4"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>\n1\n</think>\n\nAnswer: 42", "42"),
        ("<think>\n1\n</think>\n\nAnswer:    42   \n", "42"),
        ("<think>\n1\n</think>\nAnswer:42", "42"),
        ("<think>\n1\n</think>\n\nAnswer: -7", "-7"),
        # the last Answer: after the last </think> wins
        ("<think>\n1\n</think>\n\nAnswer: 3\nAnswer: 5", "5"),
        # several </think>: only the text after the last one counts
        ("<think>x</think>\nAnswer: 3\n</think>\n\nAnswer: 4", "4"),
        # no Answer: after </think>: the whole rest is the answer (as in data/mathscore.py)
        ("<think>\nAnswer: 4\n</think>\n\n5", "5"),
        ("<think>\nAnswer: 4\n</think>\n\nI am not sure.", "I am not sure."),
    ],
)
def test_extract_answer(completion: str, expected: str) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "<think>\n2 + 2 = 4\nAnswer: 4\n",  # truncated: the answer inside <think> does not count
        "<think>\nAnswer: 4\n</think>\n\n",  # answer only inside <think>
        "<think>\nAnswer: 4\n</think>\nAnswer: 4\n</think>\n\n",  # last segment has none
        "<think>\n1\n</think>\n\nAnswer:   ",  # empty answer
        "",
        "Answer: 4",  # never thought, never closed
    ],
)
def test_extract_answer_none(completion: str) -> None:
    assert extract_answer(completion) is None


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("42", "42"),
        ("  42 ", "42"),
        ("+42", "42"),
        ("0042", "42"),
        ("-0", "0"),
        ("+0", "0"),
        ("-007", "-7"),
        ("- 12", "-12"),
        ("1 234", "1234"),
        ("42.", "42"),
        ("42 .", "42"),
        ("Alice  wins.", "Alice wins"),
        ("3.5", "3.5"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, canonical: str) -> None:
    assert normalize_answer(raw) == canonical


def test_answer_inside_think_never_counts() -> None:
    text = "<think>\nSo it is 42.\nAnswer: 42\n</think>\n\nAnswer: 41"
    assert extract_answer(text) == "41"
    assert not answers_match(extract_answer(text), "42")


def test_answers_match() -> None:
    assert answers_match("042", "42")
    assert answers_match("-0", "0")
    assert not answers_match("41", "42")
    assert not answers_match("-42", "42")
    assert not answers_match(None, "42")


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_count_tokens_splits_at_last_close() -> None:
    text = "<think>\nab\n</think>\n\nAnswer: 7"
    think, answer, total = count_tokens(_chars, text)
    assert think == len("<think>\nab\n</think>")
    assert answer == len("\n\nAnswer: 7")
    assert total == think + answer == len(text)


def test_count_tokens_truncated_trace_is_all_think() -> None:
    text = "<think>\nstill going"
    assert count_tokens(_chars, text) == (len(text), 0, len(text))


def test_count_tokens_empty_answer_part() -> None:
    assert count_tokens(_chars, "<think></think>") == (15, 0, 15)


def test_an_untagged_answer_is_the_marked_boxed_or_last_number() -> None:
    """Models without <think> tags (SmolLM2) answer in prose: Answer:, then \\boxed{}, then
    the last number (GSM8K's flexible rule), commas dropped."""
    from data.answers import extract_answer, extract_untagged_answer

    assert extract_untagged_answer("She sells 9 eggs, making $18.") == "18"
    assert extract_untagged_answer("Total: 1,234 apples") == "1234"
    assert extract_untagged_answer("so 3 and then Answer: 7") == "7"
    assert extract_untagged_answer(r"thus \boxed{\frac{1}{2}} or 5") == r"\frac{1}{2}"
    assert extract_untagged_answer("no numbers at all") is None
    assert extract_answer("It is 12.", tagged=False) == "12"
    assert extract_answer("It is 12.") is None  # tagged: no </think>, no answer


def test_a_trace_without_think_tags_counts_everything_as_reasoning() -> None:
    from data.traces import think_close_id, trace_row

    row = trace_row(
        round_=1,
        problem_id="p",
        sample_idx=0,
        text="9 eggs at $2 make $18.",
        token_ids=[5, 6, 7, 8],
        finish_reason="stop",
        prompt_tokens=3,
        gold="18",
        think_close_id=None,
        model="m",
    )
    assert (row["think_tokens"], row["answer_tokens"], row["correct"]) == (4, 0, True)

    class NoThink:  # a tokenizer without </think>: it maps the token to unk
        unk_token_id = 0

        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    assert think_close_id(NoThink()) is None

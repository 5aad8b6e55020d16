"""The completion text contract: format it, split it, grade it, count it.

Every stage that reads a trace goes through these functions, so sampling,
rewriting, filtering and evaluation can never disagree about what the answer
of a trace is or how long its reasoning was. A completion looks like::

    <think>
    347 + 258 = 605
    605 - 129 = 476
    </think>

    Answer: 476

Only the text after the LAST ``</think>`` is graded: an answer that appears
inside the reasoning does not count (the model must commit to it), and a trace
without ``</think>`` has no answer (it was truncated while thinking).

Pure Python, no tokenizer import: token counting takes any ``encode`` callable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_MARK = "Answer:"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_INT_RE = re.compile(r"[+-]?\d+")


def format_prompt(question: str) -> str:
    """The chat-formatted prompt; equal to the tokenizer's chat template output.

    Kept here as a plain string function so engines and tests can build prompts
    without loading a tokenizer, and a test can hold the template to it.
    """
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def format_completion(think_lines: Sequence[str], answer: str) -> str:
    """A completion in the contract format (EOS not included)."""
    body = "\n".join(think_lines)
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n\n{ANSWER_MARK} {answer}"


def split_trace(completion: str) -> tuple[str, str | None]:
    """Split at the last ``</think>``: (think part including it, rest) or (all, None).

    The think part keeps the closing tag so that ``think + answer == completion``
    and token counts of the two parts add up at a token boundary.
    """
    cut = completion.rfind(THINK_CLOSE)
    if cut < 0:
        return completion, None
    end = cut + len(THINK_CLOSE)
    return completion[:end], completion[end:]


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str, commands: tuple[str, ...] = ("\\boxed{",)) -> str | None:
    """The content of the last ``\\boxed{...}`` (of the last of ``commands``) in ``text``, braces
    balanced (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``), stripped; None when there is
    none or its braces never close."""
    starts = [i + len(cmd) for cmd in commands if (i := text.rfind(cmd)) >= 0]
    if not starts:
        return None
    start, depth = max(starts), 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j].strip()
    return None


def extract_untagged_answer(completion: str) -> str | None:
    """The answer of a model that does not reason inside ``<think>`` tags (its tokenizer has no
    ``</think>``, e.g. SmolLM2): what follows the last ``Answer:``, else the last ``\\boxed{}``,
    else the last number of the text (commas dropped), the way GSM8K is scored for chat
    models that answer in prose. None when the text has none of them."""
    cut = completion.rfind(ANSWER_MARK)
    if cut >= 0:
        return completion[cut + len(ANSWER_MARK) :].strip() or None
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed or None
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def extract_answer(completion: str, *, tagged: bool = True) -> str | None:
    """What follows the last ``Answer:`` after the last ``</think>``, stripped.

    Without an ``Answer:`` there, the whole text after ``</think>`` is the
    answer (the same rule as ``data/mathscore.py``, so both graders agree). None
    when the trace never closed its reasoning or nothing follows: both are "no
    answer", never a guess from inside the reasoning. ``tagged=False``: a model without
    ``<think>`` tags (:func:`extract_untagged_answer`).
    """
    if not tagged:
        return extract_untagged_answer(completion)
    _, rest = split_trace(completion)
    if rest is None:
        return None
    cut = rest.rfind(ANSWER_MARK)
    if cut >= 0:
        rest = rest[cut + len(ANSWER_MARK) :]
    return rest.strip() or None


def normalize_answer(s: str) -> str:
    """Canonical text of an answer, so that harmless spelling differences agree.

    Integers (possibly written with spaces, a unary plus, leading zeros or as
    ``-0``) become Python's ``str(int(...))``; anything else keeps its words
    with whitespace collapsed. A trailing period is dropped in both cases.
    """
    text = " ".join(s.split()).rstrip(".").strip()
    compact = text.replace(" ", "")
    if _INT_RE.fullmatch(compact):
        return str(int(compact))
    return text


def answers_match(pred: str | None, gold: str) -> bool:
    """Exact match after normalisation; a missing prediction is never correct."""
    if pred is None:
        return False
    return normalize_answer(pred) == normalize_answer(gold)


def count_tokens(encode: Callable[[str], list[int]], completion: str) -> tuple[int, int, int]:
    """(think tokens, answer tokens, total) of a completion.

    Think = the text up to and including the last ``</think>`` (the whole text
    when there is none, as a truncated trace is all reasoning); answer = the
    rest. Encoding the two parts separately is exact when ``</think>`` is an
    added token, because added tokens always sit on a token boundary.
    """
    think, rest = split_trace(completion)
    n_think = len(encode(think))
    n_answer = len(encode(rest)) if rest else 0
    return n_think, n_answer, n_think + n_answer

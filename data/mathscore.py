"""Grade a model's answer against a gold answer: math-verify or exact text.

Math answers are compared with math-verify, gold first, because ``verify`` is
not symmetric (``x=3`` as gold accepts ``3``; the assignment is simplified on
the gold side). Both sides are parsed the same way: a bare answer such as
``\\sqrt{2}`` or ``2x+1`` is not found by math-verify's extractors unless it is
inside ``$...$`` or ``\\boxed{}`` (a bare ``2x+1`` parses as ``2``), so we try
``$answer$``, then ``\\boxed{answer}`` (which survives an escaped ``\\$``), then
the raw text, and keep the first parse that yields a SymPy object.

Thread safety: math-verify's default timeouts use ``signal.alarm``, which
raises off the main thread and would also cancel pytest-timeout's alarm on the
main one, so every call passes ``parsing_timeout=None`` / ``timeout_seconds=None``.
Without a timeout a number such as ``9^{9^{9}}`` would hang a worker forever
(SymPy computes the exact integer), so parsed objects with huge integer powers
or factorials are dropped before ``verify`` sees them (:func:`_too_big`).

Sample use::

    grade("<think>...</think>\\n\\nAnswer: 0.5", "\\frac{1}{2}", "math")  # True
    grade("Paris", "paris", "exact")                                      # False
"""

from __future__ import annotations

import math

import sympy
from math_verify import parse, verify

THINK_CLOSE = "</think>"
ANSWER_MARK = "Answer:"

# Largest |exponent| (for a base other than 0, ±1) and factorial argument that
# SymPy may evaluate exactly. 2^100000 verifies in ~0.3 s; 9^(9^9) never ends.
MAX_EXPONENT = 1e5
MAX_FACTORIAL = 1e4


def _after_think(completion: str) -> str | None:
    """Text after the last ``</think>``; None when the reasoning never closed.

    A private copy of the rule in ``data/answers.py`` so this module grades
    full completions without importing the rest of the package.
    """
    cut = completion.rfind(THINK_CLOSE)
    if cut < 0:
        return None
    return completion[cut + len(THINK_CLOSE) :]


def _answer_text(completion_or_answer: str | None) -> str | None:
    """The answer to grade: the text itself, or the answer part of a completion.

    A string mentioning ``<think>``/``</think>`` is a completion: only what
    follows the last ``</think>`` counts, and after the last ``Answer:`` when
    there is one. Anything else is taken to be an already-extracted answer.
    """
    text = completion_or_answer
    if text is None:
        return None
    if "<think>" in text or THINK_CLOSE in text:
        text = _after_think(text)
        if text is None:
            return None
        cut = text.rfind(ANSWER_MARK)
        if cut >= 0:
            text = text[cut + len(ANSWER_MARK) :]
    text = text.strip()
    return text or None


def _approx(expr: sympy.Basic) -> float | None:
    """A float estimate of a numeric subexpression, inf when it overflows.

    Pure float arithmetic (never SymPy evaluation, which is what hangs); None
    for anything it does not understand, which :func:`_too_big` then trusts.
    """
    try:
        if isinstance(expr, sympy.Number | sympy.NumberSymbol):
            return float(expr)
        parts = [_approx(a) for a in expr.args]
        if not parts or any(p is None for p in parts):
            return None
        if isinstance(expr, sympy.Add):
            return math.fsum(parts)  # type: ignore[arg-type]
        if isinstance(expr, sympy.Mul):
            return math.prod(parts)  # type: ignore[arg-type]
        if isinstance(expr, sympy.Pow):
            base, exp = parts
            return float(abs(base) ** exp)  # type: ignore[operator]
    except (OverflowError, ZeroDivisionError, TypeError, ValueError):
        return math.inf
    return None


def _too_big(obj: object) -> bool:
    """Whether exact evaluation of ``obj`` could take unbounded time or memory."""
    if not isinstance(obj, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(obj):
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            base, exp = _approx(node.base), _approx(node.exp)
            trivial = base is not None and abs(base) in (0.0, 1.0)
            if exp is not None and abs(exp) > MAX_EXPONENT and not trivial:
                return True
        if isinstance(node, sympy.factorial | sympy.gamma | sympy.binomial):
            arg = _approx(node.args[0])
            if arg is not None and abs(arg) > MAX_FACTORIAL:
                return True
    return False


def _parse_answer(text: str) -> list:
    """Parse ``text`` as math-verify would see a delimited answer (see module doc).

    Returns math-verify's list (SymPy objects and/or the matched strings) with
    too-big objects removed; empty when nothing could be parsed.
    """
    candidates = []
    if "$" not in text and "\\boxed" not in text:
        candidates.append(f"${text}$")
    if "\\boxed" not in text:
        candidates.append(f"\\boxed{{{text}}}")
    candidates.append(text)
    fallback: list = []
    for candidate in candidates:
        parsed = [p for p in parse(candidate, parsing_timeout=None) if not _too_big(p)]
        if any(not isinstance(p, str) for p in parsed):
            return parsed
        fallback = fallback or parsed
    return fallback


def math_equal(gold: str, pred: str | None) -> bool | None:
    """Whether ``pred`` equals ``gold`` mathematically; None if gold cannot be parsed.

    None means "cannot be checked" (math-verify finds nothing in the gold
    answer), which is different from wrong; a missing or empty prediction is
    False. Safe to call from worker threads (no signals).
    """
    gold_parsed = _parse_answer(gold.strip())
    if not gold_parsed:
        return None
    if pred is None or not pred.strip():
        return False
    pred_parsed = _parse_answer(pred.strip())
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def exact_equal(gold: str, pred: str | None) -> bool:
    """String equality after collapsing whitespace; case and punctuation matter."""
    if pred is None:
        return False
    return " ".join(pred.split()) == " ".join(gold.split())


def grade(completion_or_answer: str | None, gold: str, scorer: str) -> bool:
    """Whether a completion (or its extracted answer) is correct under ``scorer``.

    ``scorer`` is ``"math"`` (math-verify) or ``"exact"``. A completion that
    never closed ``</think>`` has no answer and is wrong. When the gold answer
    cannot be parsed as math, the math scorer falls back to exact comparison
    rather than marking every sample wrong (or right).
    """
    if scorer not in ("math", "exact"):
        raise ValueError(f"unknown scorer {scorer!r}; expected 'math' or 'exact'")
    pred = _answer_text(completion_or_answer)
    if scorer == "exact":
        return exact_equal(gold, pred)
    result = math_equal(gold, pred)
    return exact_equal(gold, pred) if result is None else result

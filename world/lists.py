"""Operations on a short list: sum of the numbers above a threshold, or range.

Questions::

    Here is a list of numbers: 12, 7, 33, 5, 19. What is the sum of the numbers greater than 10?
    Here is a list of numbers: 12, 7, 33, 5, 19. What is the largest number minus the smallest number?

Difficulty d (1–5) sets the list length to d + 3 and the value size (up to
20 at d = 1, up to 300 at d = 5). "Sum above" is one comparison per element
then one addition per kept element after the first; "range" is a running max,
a running min, then one subtraction (2·length − 1 steps).
"""

from __future__ import annotations

import random
import re

from world.steps import Tape

NAME = "lists"
_VALUE_MAX = {1: 20, 2: 50, 3: 99, 4: 150, 5: 300}
_LIST = re.compile(r"Here is a list of numbers: ([\d, ]+)\.")
_SUM_ABOVE = re.compile(r"What is the sum of the numbers greater than (\d+)\?")
_RANGE = "What is the largest number minus the smallest number?"


def generate(rng: random.Random, difficulty: int) -> str:
    """A threshold that keeps at least two numbers and drops at least one."""
    values = [rng.randint(1, _VALUE_MAX[difficulty]) for _ in range(difficulty + 3)]
    head = f"Here is a list of numbers: {', '.join(map(str, values))}."
    ordered = sorted(values)
    if rng.random() < 0.5 or ordered[-2] <= ordered[0]:
        return f"{head} {_RANGE}"
    lo = ordered[0]
    hi = ordered[-2] - 1
    return f"{head} What is the sum of the numbers greater than {rng.randint(lo, hi)}?"


def _sum_above(values: list[int], threshold: int, tape: Tape) -> int:
    kept = [x for x in values if tape.apply("gt", x, threshold)]
    if not kept:
        return 0
    total = kept[0]
    for x in kept[1:]:
        total = tape.apply("add", total, x)
    return total


def _range(values: list[int], tape: Tape) -> int:
    largest = smallest = values[0]
    for x in values[1:]:
        largest = tape.apply("max", largest, x)
    for x in values[1:]:
        smallest = tape.apply("min", smallest, x)
    return tape.apply("sub", largest, smallest)


def solve(question: str, tape: Tape) -> tuple[int, str]:
    """Read the list, then run the asked operation element by element."""
    match = _LIST.match(question.strip())
    if match is None:
        raise ValueError(f"not a lists question: {question!r}")
    values = [int(v) for v in match.group(1).split(", ")]
    tape.note(f"The list is {', '.join(map(str, values))}.")
    tape.note(f"It has {len(values)} numbers.")
    rest = question.strip()[match.end() :].strip()
    if rest == _RANGE:
        return _range(values, tape), "the largest number minus the smallest number"
    ask = _SUM_ABOVE.fullmatch(rest)
    if ask is None:
        raise ValueError(f"not a lists question: {question!r}")
    threshold = int(ask.group(1))
    return _sum_above(values, threshold, tape), f"the sum of the numbers greater than {threshold}"

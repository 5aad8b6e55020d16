"""Modular powers by repeated multiply-and-reduce.

Question::

    What is the remainder when 7 to the power 4 is divided by 13?

Solved as a student would without a formula: reduce the base if it is not
below the modulus, then multiply by the (reduced) base and reduce, e − 1 times
(a product already below the modulus needs no reduction step)::

    7 * 7 = 49, 49 mod 13 = 10, 10 * 7 = 70, 70 mod 13 = 5, 5 * 7 = 35, 35 mod 13 = 9

Difficulty d (1–5) sets the exponent to d + 1 or d + 2 (so at most 2d + 2
steps, one more when the base, up to five times the modulus, needs reducing
first) and the modulus range (5–20 at d = 1 up to 17–50 at d = 5). Reductions
keep every product below the square of the modulus, so each division has a
quotient below the modulus. This is the family with the fewest distinct
questions: about 1,700 at d = 1 and 3,700 at d = 3.
"""

from __future__ import annotations

import random
import re

from world.steps import Tape

NAME = "modular"
_MOD_RANGE = {1: (5, 20), 2: (8, 25), 3: (11, 30), 4: (13, 40), 5: (17, 50)}
_QUESTION = re.compile(r"What is the remainder when (\d+) to the power (\d+) is divided by (\d+)\?")


def generate(rng: random.Random, difficulty: int) -> str:
    """A base that is neither 0 nor 1 modulo m, so the powers do not stall."""
    m = rng.randint(*_MOD_RANGE[difficulty])
    residue = rng.randint(2, m - 1)
    base = residue + m * rng.randint(0, 4)
    exponent = rng.randint(difficulty + 1, difficulty + 2)
    return f"What is the remainder when {base} to the power {exponent} is divided by {m}?"


def solve(question: str, tape: Tape) -> tuple[int, str]:
    """Multiply by the reduced base and reduce, exponent − 1 times."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a modular question: {question!r}")
    base, exp, m = (int(g) for g in match.groups())
    tape.note(f"The base is {base}, the exponent is {exp}, and the modulus is {m}.")
    tape.note(f"I multiply by the base {exp - 1} times, reducing mod {m} after each product.")
    if base >= m:
        base = tape.apply("mod", base, m)
    value = base
    for _ in range(exp - 1):
        product = tape.apply("mul", value, base)
        value = tape.apply("mod", product, m) if product >= m else product
    return value, f"the remainder of {match.group(1)} to the power {exp} divided by {m}"

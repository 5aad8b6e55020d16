"""Chained arithmetic: a start value and a list of +, −, × instructions.

Question::

    Start with 347. Add 258. Subtract 129. Multiply by 3. What is the final number?

Difficulty d (1–5) sets d + 1 instructions and the operand size (1–2 digits at
d = 1 up to 3–4 digits at d = 5); multipliers are single digits, so the hard
part is carrying and borrowing across many columns, which is what the verbose
style narrates.
"""

from __future__ import annotations

import random
import re

from world.steps import Tape

NAME = "arith"
_DIGITS = {1: (1, 2), 2: (2, 2), 3: (2, 3), 4: (3, 3), 5: (3, 4)}
_START = re.compile(r"Start with (\d+)\.")
_INSTR = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")
_OP = {"Add": "add", "Subtract": "sub", "Multiply by": "mul"}
_VERB = {"add": "add", "sub": "subtract", "mul": "multiply by"}
_ALL_OPS = ("add", "sub", "mul")


def _operand(rng: random.Random, difficulty: int) -> int:
    lo, hi = _DIGITS[difficulty]
    digits = rng.randint(lo, hi)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def generate(rng: random.Random, difficulty: int) -> str:
    """Instructions whose running value never goes negative or explodes."""
    value = _operand(rng, difficulty)
    parts = [f"Start with {value}."]
    cap = 10 ** (_DIGITS[difficulty][1] + 1)
    for _ in range(difficulty + 1):
        no_mul = value >= cap or parts[-1].startswith("Multiply")
        op = rng.choice(_ALL_OPS[:2] if no_mul else _ALL_OPS)
        if op == "mul":
            n = rng.randint(2, 9)
            value *= n
            parts.append(f"Multiply by {n}.")
        elif op == "sub" and value >= 2:
            n = _operand(rng, difficulty)
            n = n if n < value else rng.randint(1, value - 1)
            value -= n
            parts.append(f"Subtract {n}.")
        else:
            n = _operand(rng, difficulty)
            value += n
            parts.append(f"Add {n}.")
    parts.append("What is the final number?")
    return " ".join(parts)


def solve(question: str, tape: Tape) -> tuple[int, str]:
    """Follow the instructions left to right, one step per instruction."""
    start = _START.search(question)
    if start is None:
        raise ValueError(f"not an arith question: {question!r}")
    value = int(start.group(1))
    tape.note(f"We start with {value}.")
    for word, num in _INSTR.findall(question):
        op, n = _OP[word], int(num)
        tape.note(f"Then we {_VERB[op]} {n}.")
        value = tape.apply(op, value, n)
    return value, "the final number"

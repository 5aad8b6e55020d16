"""Held-out family: compare two shopping bills (evaluation only).

Question::

    Tom orders 3 pens that cost 17 dollars each and 2 bags that cost 45 dollars each.
    Ana orders 4 cups that cost 9 dollars each. How many more dollars does the one
    who spends more pay?

New surface, old skills: the products, sums, comparison and subtraction are
the same steps the training families use, so a student that learnt to be
concise there should stay concise here if conciseness generalises. Difficulty
d (1–5) sets 1–3 item kinds per person and the price size (single digits at
d = 1, up to 199 at d = 5); quantities are single digits.
"""

from __future__ import annotations

import random
import re

from world.steps import Tape

NAME = "shopping"
_NAMES = ("Tom", "Ana", "Leo", "Mia", "Sam", "Zoe", "Ben", "Ivy")
_ITEMS = ("pens", "bags", "cups", "books", "lamps", "hats", "plates", "shirts")
_PRICE = {1: (2, 9), 2: (5, 20), 3: (10, 50), 4: (10, 99), 5: (20, 199)}
_PERSON = re.compile(r"(\w+) orders (.+)\.")
_ITEM = re.compile(r"(\d+) (\w+) that cost (\d+) dollars each")
_ASK = "How many more dollars does the one who spends more pay?"


def _order(rng: random.Random, name: str, items: list[str], d: int) -> tuple[str, int]:
    parts, total = [], 0
    for item in items:
        qty, price = rng.randint(2, min(9, 2 + d)), rng.randint(*_PRICE[d])
        parts.append(f"{qty} {item} that cost {price} dollars each")
        total += qty * price
    return f"{name} orders {' and '.join(parts)}.", total


def generate(rng: random.Random, difficulty: int) -> str:
    """Two orders with different totals (redrawn until they differ)."""
    n_items = 1 + (difficulty >= 2) + (difficulty >= 4)
    names = rng.sample(_NAMES, 2)
    while True:
        items = rng.sample(_ITEMS, 2 * n_items)
        first, total_a = _order(rng, names[0], items[:n_items], difficulty)
        second, total_b = _order(rng, names[1], items[n_items:], difficulty)
        if total_a != total_b:
            return f"{first} {second} {_ASK}"


def _bill(sentence: str, tape: Tape) -> tuple[str, int]:
    match = _PERSON.fullmatch(sentence)
    if match is None:
        raise ValueError(f"not a shopping sentence: {sentence!r}")
    name = match.group(1)
    total = None
    for qty, item, price in _ITEM.findall(match.group(2)):
        tape.note(f"{name} buys {qty} {item} at {price} dollars each.")
        cost = tape.apply("mul", int(qty), int(price), f"{name} {item}")
        total = cost if total is None else tape.apply("add", total, cost, f"{name} total")
    if total is None:
        raise ValueError(f"no items in {sentence!r}")
    return name, total


def solve(question: str, tape: Tape) -> tuple[int, str]:
    """Each bill as products and sums, then compare and subtract."""
    body = question.strip().removesuffix(_ASK).strip()
    sentences = re.split(r"(?<=\.)\s+", body)
    if len(sentences) != 2 or not question.strip().endswith(_ASK):
        raise ValueError(f"not a shopping question: {question!r}")
    (name_a, total_a), (name_b, total_b) = (_bill(s, tape) for s in sentences)
    if tape.apply("gt", total_a, total_b):
        return tape.apply("sub", total_a, total_b, "difference"), _goal(name_a, name_b)
    return tape.apply("sub", total_b, total_a, "difference"), _goal(name_a, name_b)


def _goal(name_a: str, name_b: str) -> str:
    return f"how many more dollars the bigger spender of {name_a} and {name_b} pays"

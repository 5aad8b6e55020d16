"""The problem families and the one place that turns a question into a Problem.

A family is a module with ``NAME``, ``generate(rng, difficulty) -> question``
and ``solve(question, tape) -> (answer, goal)``. Generation only writes text;
the solution always comes from solving that text, so a problem record (which
stores only the question) is enough to rebuild its steps, and a corrupted
solution is the same solver run with one slip on the tape.
"""

from __future__ import annotations

import random
from types import ModuleType

from data.answers import answers_match
from world import arith, lists, modular, shopping, transfer
from world.steps import Problem, Tape

FAMILIES: dict[str, ModuleType] = {m.NAME: m for m in (arith, transfer, modular, lists, shopping)}
TRAIN_FAMILIES: tuple[str, ...] = ("arith", "transfer", "modular", "lists")
HELDOUT_FAMILIES: tuple[str, ...] = ("shopping",)
DIFFICULTIES = range(1, 6)


def solve(
    family: str, question: str, difficulty: int, slip: tuple[int, int] | None = None
) -> Problem:
    """Solve ``question`` with the family's solver; ``slip`` injects one wrong result."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    tape = Tape(slip=slip)
    answer, goal = FAMILIES[family].solve(question, tape)
    return Problem(
        family=family,
        difficulty=difficulty,
        question=question,
        answer=str(answer),
        steps=tuple(tape.steps),
        given=tuple(tape.given),
        goal=goal,
    )


def generate(family: str, rng: random.Random, difficulty: int) -> Problem:
    """A fresh problem of ``family`` drawn from ``rng``."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    question = FAMILIES[family].generate(rng, difficulty)
    return solve(family, question, difficulty)


def check(pred: str | None, gold: str) -> bool:
    """The exact checker of every built-in family: integer answers, normalised.

    All five families answer with one integer, so one checker serves them all;
    it gives no partial credit (unlike reasoning-gym's ``score_answer``).
    """
    return answers_match(pred, gold)


def corrupt(problem: Problem, rng: random.Random, tries: int = 32) -> Problem:
    """The same problem solved with one slipped step that changes the final answer.

    A slip can cancel out (a flipped comparison of a number that was never
    used, a remainder that lands on the same value), so slips are drawn until
    the answer differs; problems where no slip matters raise ValueError.
    """
    if not problem.steps:
        raise ValueError(f"{problem.question!r} has no steps to corrupt")
    for _ in range(tries):
        slip = (rng.randrange(len(problem.steps)), rng.randrange(4))
        bad = solve(problem.family, problem.question, problem.difficulty, slip)
        if bad.answer != problem.answer:
            return bad
    raise ValueError(f"no slip changes the answer of {problem.question!r}")

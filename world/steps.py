"""Structured solutions: the steps both solution styles render.

A family solves a question by calling :meth:`Tape.apply` once per elementary
operation; the tape records each as a :class:`Step`. Verbose and concise
renderers walk the same steps, so a concise rewrite of a verbose trace is, by
construction, the same approach with the narration deleted. A deliberate slip
(one wrong result, propagated because later steps read the tape's returned
value) gives the corrupted traces that teachers learn to repair::

    Step(op="add", a=347, b=258, result=605, label="", why="")
    Step(op="sub", a=23, b=5, result=18, label="Alice", why="Alice gives 5 apples to Bob.")
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPS = ("add", "sub", "mul", "mod", "gt", "max", "min")


@dataclass(frozen=True)
class Step:
    """One operation and its result (possibly a slipped result, see Tape).

    ``label`` names the quantity the result belongs to (a person, an item) and
    prefixes the concise line; ``why`` is the sentence of the question that
    caused the step, used by the verbose style as its narration.
    """

    op: str
    a: int
    b: int
    result: int
    label: str = ""
    why: str = ""

    def true_result(self) -> int:
        return compute(self.op, self.a, self.b)

    @property
    def is_slip(self) -> bool:
        return self.result != self.true_result()


@dataclass(frozen=True)
class Problem:
    """A problem with its worked solution; the question is the source of truth.

    Everything but ``difficulty`` is a function of ``(family, question)``: see
    ``world.families.solve``. ``given`` are the facts the verbose style
    restates; ``goal`` is what the question asks, as a noun phrase.
    """

    family: str
    difficulty: int
    question: str
    answer: str
    steps: tuple[Step, ...]
    given: tuple[str, ...] = ()
    goal: str = "the result"


def compute(op: str, a: int, b: int) -> int:
    """The true result of one operation (``gt`` is 1 for yes, 0 for no)."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "mod":
        return a % b
    if op == "gt":
        return int(a > b)
    if op == "max":
        return max(a, b)
    if op == "min":
        return min(a, b)
    raise ValueError(f"unknown op {op!r}")


def slipped(op: str, a: int, b: int, variant: int) -> int:
    """A plausible wrong result: off by one or by ten, a flipped comparison.

    ``variant`` picks among the slips of the op deterministically, so a corrupted
    problem is reproducible from ``(question, step index, variant)``.
    """
    r = compute(op, a, b)
    if op == "gt":
        return 1 - r
    if op in ("max", "min"):
        return a + b - r
    if op == "mod":
        return (r + (1 if variant % 2 else -1)) % b if b > 1 else r
    delta = (1, -1, 10, -10)[variant % 4]
    return r + delta if r + delta >= 0 else r - delta


@dataclass
class Tape:
    """Records steps as a family solves; injects at most one slip.

    ``slip = (index, variant)`` makes the step with that index return a wrong
    result; the family's code carries the wrong value forward like a student
    who did not notice.
    """

    slip: tuple[int, int] | None = None
    steps: list[Step] = field(default_factory=list)
    given: list[str] = field(default_factory=list)

    def apply(self, op: str, a: int, b: int, label: str = "", why: str = "") -> int:
        if self.slip is not None and self.slip[0] == len(self.steps):
            result = slipped(op, a, b, self.slip[1])
        else:
            result = compute(op, a, b)
        self.steps.append(Step(op, a, b, result, label, why))
        return result

    def note(self, fact: str) -> None:
        self.given.append(fact)

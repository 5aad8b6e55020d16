"""Renderings of one solution: verbose (the habit), and two rewrite targets.

Both walk ``problem.steps`` in order and both contain each step's equation
line verbatim, so the concise trace is a subsequence of the verbose trace's
lines: rewriting verbose into concise is deleting, never re-solving. Concise::

    <think>
    347 + 258 = 605
    605 - 129 = 476
    </think>

    Answer: 476

The steps style (the other target, ``bootstrap.target_style: steps``) keeps
what the student needs to follow its own path: each step's header (which
numbers, and why), its equation and the running value after it::

    <think>
    Step 1: I add 258 to 347.
    347 + 258 = 605
    The result so far is 605.
    Step 2: She gave away 129. I subtract 129 from 605.
    605 - 129 = 476
    The result so far is 476.
    So the answer is 476.
    </think>

    Answer: 476

Why it exists: a model as small as the shipped student reads its operands off
the header and the running value it has just written. Trained on perfect
traces of each style (``benchmarks/style_probe.py``), it keeps its accuracy on
the steps style at half the verbose length, and loses two thirds of it on the
concise style. Both targets are subsequences of the verbose trace's lines.

Verbose adds, per ``verbosity`` level (each level includes the ones below):

1. a restatement of the problem, a header per step in words, and the running
   value after each step;
2. (the default) a re-check after every step that invites one (carry, borrow,
   big product, quotient ≥ 2, close comparison), a recap of the intermediate
   results and a final re-reading of the question;
3. the column-by-column (add/sub) or part-by-part (mul, mod) work before each
   equation. This one changes how a step is computed, not only how it is
   told, so a student trained on it may lean on it: compressing it away tests
   more than deleting redundancy.

Length varies with the problem (digits, carries, steps), not with chance; the
``rng`` only picks among interchangeable phrasings of the same length.
"""

from __future__ import annotations

import random

from data.answers import format_completion
from world.families import corrupt
from world.narrate import detail, equation, header, recheck, so_far
from world.steps import Problem, Step

VERBOSITY_LEVELS = (1, 2, 3)
TARGET_STYLES = ("concise", "steps")
STYLES = ("verbose", "steps", "concise", "other")
_OPENERS = (
    "Okay, let me read the problem carefully.",
    "Alright, let me read the problem carefully.",
    "Okay, let me go through the problem carefully.",
)
# The built-in student's verbose traces all open with this one line: its choice of style is
# then one decision at the first think token (verbose opener or "Step 1:"), and greedy
# decoding takes the verbose branch as long as it holds the majority of that token's mass
# (three openers would split it). See world/corpus.py.
STUDENT_OPENER = _OPENERS[0]
_PLANS = (
    "That takes {n} steps, so I will go one step at a time.",
    "That takes {n} steps, so I will do them one at a time.",
)


def concise_lines(problem: Problem) -> list[str]:
    """One equation per step, nothing else."""
    return [equation(step) for step in problem.steps]


def render_concise(problem: Problem) -> str:
    """The concise completion: the target of every rewrite of this problem."""
    return format_completion(concise_lines(problem), problem.answer)


def steps_lines(problem: Problem) -> list[str]:
    """Header, equation and running value per step, then the answer sentence:
    verbose level 1 without the opening restatement of the problem."""
    lines = []
    for index, step in enumerate(problem.steps, start=1):
        lines += [header(step, index), equation(step), so_far(step)]
    lines.append(f"So the answer is {problem.answer}.")
    return lines


def render_steps(problem: Problem) -> str:
    """The steps-style completion (see the module docstring)."""
    return format_completion(steps_lines(problem), problem.answer)


def render_target(problem: Problem, style: str = "concise") -> str:
    """The rewrite target of ``problem`` in one of ``TARGET_STYLES``."""
    if style == "concise":
        return render_concise(problem)
    if style == "steps":
        return render_steps(problem)
    raise ValueError(f"target style must be one of {TARGET_STYLES}, got {style!r}")


def verbose_lines(
    problem: Problem, rng: random.Random, verbosity: int = 2, opener: str | None = None
) -> list[str]:
    """The verbose think lines; see the module docstring for what each level adds.

    ``opener`` fixes the first line; by default it is drawn from three equivalent ones.
    """
    if verbosity not in VERBOSITY_LEVELS:
        raise ValueError(f"verbosity must be one of {VERBOSITY_LEVELS}, got {verbosity}")
    first = opener if opener is not None else rng.choice(_OPENERS)
    lines = [first, *problem.given, f"The question asks for {problem.goal}."]
    lines.append(rng.choice(_PLANS).format(n=len(problem.steps)))
    for index, step in enumerate(problem.steps, start=1):
        lines.append(header(step, index))
        if verbosity >= 3:
            lines.extend(detail(step))
        lines.append(equation(step))
        check = recheck(step) if verbosity >= 2 else None
        if check:
            lines.append(check)
        lines.append(so_far(step))
    if verbosity >= 2:
        results = ", ".join(_result_word(step) for step in problem.steps)
        lines.append(f"Let me list the results once more: {results}.")
        lines.append(f"The question asks for {problem.goal}, and that is {problem.answer}.")
    lines.append(f"So the answer is {problem.answer}.")
    return lines


def render_verbose(
    problem: Problem,
    rng: random.Random,
    verbosity: int = 2,
    error_rate: float = 0.0,
    opener: str | None = None,
) -> str:
    """A verbose completion; with probability ``error_rate``, one step slips.

    A slipped trace carries the wrong value to a wrong final answer (see
    ``families.corrupt``); its rewrite target is still ``render_concise`` of
    the original problem, which is how a teacher learns to fix errors.
    """
    if error_rate > 0 and rng.random() < error_rate:
        problem = corrupt(problem, rng)
    return format_completion(verbose_lines(problem, rng, verbosity, opener), problem.answer)


def style_of(completion: str) -> str:
    """Which of ``STYLES`` a completion is written in, read off its first think line.

    The styles part at that line (an opener, ``Step 1:`` or an equation), so one line
    tells them apart; ``other`` is anything else (a degenerate or foreign trace).
    """
    lines = completion.split("\n", 2)
    first = lines[1] if len(lines) > 1 and lines[0] == "<think>" else ""
    if first.startswith("Step 1:"):
        return "steps"
    if first in _OPENERS:
        return "verbose"
    if " = " in first:
        return "concise"
    return "other"


def _result_word(step: Step) -> str:
    if step.op == "gt":
        return "yes" if step.result else "no"
    return str(step.result)

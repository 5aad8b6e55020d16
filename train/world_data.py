"""Training examples for the built-in models, drawn fresh from the world's generators.

Student: plain problem prompt -> verbose trace (the habit MPD must break).
Teacher: a mixture of two tasks with one output style, the target style
(``target_style``: the bare "concise" equations by default, or the "steps" style):
  solve    plain problem prompt                   -> target trace
  rewrite  rewrite prompt (problem + verbose trace) -> target trace of the *correct* solution
A share of rewrite inputs carry one slipped step (``corrupt``), so the teacher
learns to fix errors rather than copy them. The teacher needs both skills: it
rewrites, and it scores targets under the plain problem prompt (METHODS.md).

Problems whose question is in ``exclude`` (the test and held-out sets) are
never trained on. Examples are (prompt_ids, target_ids) with the target ending
in the end-of-turn token, so models learn to stop.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from data.answers import IM_END, format_prompt
from data.prompts import rewrite_prompt
from data.world import TRAIN_FAMILIES, corrupt, generate, render_target, render_verbose

Example = tuple[list[int], list[int]]


def _texts(
    kind: str,
    n: int,
    seed: int,
    difficulty: tuple[int, int],
    verbosity: int,
    rewrite_share: float,
    error_rate: float,
    exclude: frozenset[str],
    target_style: str = "concise",
) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        family = rng.choice(TRAIN_FAMILIES)
        problem = generate(family, rng, rng.randint(*difficulty))
        if problem.question in exclude:
            continue
        if kind == "student":
            out.append((format_prompt(problem.question), render_verbose(problem, rng, verbosity)))
        elif rng.random() < rewrite_share:
            shown = problem
            if rng.random() < error_rate:
                try:
                    shown = corrupt(problem, rng)
                except ValueError:
                    shown = problem
            trace = render_verbose(shown, rng, verbosity)
            out.append(
                (rewrite_prompt(problem.question, trace), render_target(problem, target_style))
            )
        else:
            out.append((format_prompt(problem.question), render_target(problem, target_style)))
    return out


def make_texts(
    kind: str,
    n: int,
    *,
    seed: int,
    difficulty: tuple[int, int],
    verbosity: int,
    rewrite_share: float = 0.5,
    error_rate: float = 0.3,
    exclude: Sequence[str] = (),
    workers: int | None = None,
    target_style: str = "concise",
) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) texts; generated in parallel processes when large."""
    workers = workers or min(os.cpu_count() or 1, max(1, n // 2000))
    frozen = frozenset(exclude)
    parts = [n // workers + (i < n % workers) for i in range(workers)]
    args = [
        (
            kind,
            k,
            seed * 1000 + i,
            difficulty,
            verbosity,
            rewrite_share,
            error_rate,
            frozen,
            target_style,
        )
        for i, k in enumerate(parts)
    ]
    if workers == 1:
        return _texts(*args[0])
    with ProcessPoolExecutor(workers) as pool:
        chunks = list(pool.map(_texts, *zip(*args, strict=True)))
    return [t for chunk in chunks for t in chunk]


def encode(tokenizer, texts: Sequence[tuple[str, str]]) -> list[Example]:
    """Tokenize prompts and completions separately; completions end with EOS.

    Separately, because the prompt ends at ``assistant\\n`` and the completion
    starts with the ``<think>`` token: the boundary is a token boundary, so the
    target ids are exactly the ids the model would generate.
    """
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    targets = tokenizer([c + IM_END for _, c in texts], add_special_tokens=False)["input_ids"]
    return list(zip(prompts, targets, strict=True))

"""The problem set of a run: seeded, split, deduplicated, and re-solvable.

A record (the ``problems`` table of ``data/schemas.py``, less ``round`` and
``source``)::

    {"problem_id": "arith-train-000017", "family": "arith", "split": "train",
     "difficulty": 3, "prompt": "Start with 347. Add 258. ... What is the final number?",
     "answer": "1428"}

Records carry no steps: the question text determines them, and
:func:`problem_from_record` re-solves it. That keeps the table small and makes
a record copied out of a workspace (or written by hand) enough to render its
concise and verbose solutions.

Test and held-out problems are drawn before training problems, each from its
own ``Random(f"{seed}:{split}:{family}")``: the evaluation sets do not change
when ``n_train`` does, and training problems are drawn until their question
is new, so splits are disjoint by question text. Development problems (``dev``: the
training families, for choosing a recipe without looking at test) are drawn last, from
the same generators, new to every other split; asking for them changes no other split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from data.answers import IM_END, format_prompt
from world.families import HELDOUT_FAMILIES, TRAIN_FAMILIES, generate, solve
from world.steps import Problem
from world.styles import render_concise, render_verbose

Difficulty = int | tuple[int, int]
_MAX_TRIES = 1000


def _draw_split(
    seed: int,
    split: str,
    n: int,
    families: Sequence[str],
    difficulty: Difficulty,
    seen: set[str],
) -> list[dict]:
    """``n`` records, families round-robin, each question new to ``seen``."""
    if n > 0 and not families:
        raise ValueError(f"split {split!r} asks for {n} problems but names no family")
    rngs = {f: random.Random(f"{seed}:{split}:{f}") for f in families}
    counts = dict.fromkeys(families, 0)
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    records = []
    for i in range(n):
        family = families[i % len(families)]
        rng = rngs[family]
        for _ in range(_MAX_TRIES):
            problem = generate(family, rng, rng.randint(lo, hi))
            if problem.question not in seen:
                break
        else:
            raise ValueError(
                f"{family} at difficulty {difficulty} ran out of distinct problems "
                f"after {counts[family]} in split {split!r}; ask for fewer or harder ones"
            )
        seen.add(problem.question)
        records.append(_record(problem, split, counts[family]))
        counts[family] += 1
    return records


def _record(problem: Problem, split: str, index: int) -> dict:
    return {
        "problem_id": f"{problem.family}-{split}-{index:06d}",
        "family": problem.family,
        "split": split,
        "difficulty": problem.difficulty,
        "prompt": problem.question,
        "answer": problem.answer,
    }


def build_problems(
    seed: int,
    n_train: int,
    n_test: int,
    n_heldout: int,
    difficulty: Difficulty = 3,
    train_families: Sequence[str] = TRAIN_FAMILIES,
    heldout_families: Sequence[str] = HELDOUT_FAMILIES,
    n_dev: int = 0,
) -> list[dict]:
    """Train, test, held-out and dev records (in that order), deterministic in ``seed``.

    ``difficulty`` is one level (1–5) or an inclusive range drawn per problem.
    Train and test use the training families; held-out uses only the held-out
    families, so evaluating on it measures transfer to an unseen surface.
    """
    seen: set[str] = set()
    test = _draw_split(seed, "test", n_test, train_families, difficulty, seen)
    heldout = _draw_split(seed, "heldout", n_heldout, heldout_families, difficulty, seen)
    train = _draw_split(seed, "train", n_train, train_families, difficulty, seen)
    dev = _draw_split(seed, "dev", n_dev, train_families, difficulty, seen)
    return train + test + heldout + dev


def problem_from_record(record: dict) -> Problem:
    """Re-solve a record's question; refuses a record whose answer disagrees."""
    problem = solve(record["family"], record["prompt"], int(record["difficulty"]))
    if problem.answer != record["answer"]:
        raise ValueError(
            f"{record['problem_id']}: solver says {problem.answer}, record says {record['answer']}"
        )
    return problem


def corpus_texts(records: Sequence[dict], seed: int = 0, verbosity: int = 3) -> list[str]:
    """Chat-formatted prompt + completion + EOS texts, concise and verbose, per record.

    What the tokenizer is trained on: the same text the models will see, so
    its merges fit the world's words and the contract's markers. Verbosity 3
    by default so that every level's words (column work included) are merged,
    whichever level a run later renders.
    """
    rng = random.Random(seed)
    texts = []
    for record in records:
        problem = problem_from_record(record)
        prompt = format_prompt(problem.question)
        texts.append(prompt + render_concise(problem) + IM_END)
        texts.append(prompt + render_verbose(problem, rng, verbosity) + IM_END)
    return texts

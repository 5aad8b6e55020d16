"""The built-in reference world: verifiable problems, two solution styles, a tokenizer.

Public API (the tokenizer lives in ``data.world.tokenizer`` and is not
imported here, so that using problems does not import transformers)::

    build_problems(seed, n_train, n_test, n_heldout, difficulty=3) -> list[dict]
    problem_from_record(record) -> Problem
    render_concise(problem) -> str
    render_steps(problem) -> str
    render_target(problem, style) -> str          (style in TARGET_STYLES)
    render_verbose(problem, rng, verbosity=2, error_rate=0.0, opener=None) -> str
    style_of(completion) -> str                    (one of STYLES)
    corrupt(problem, rng) -> Problem
    check(pred, gold) -> bool
"""

from data.world.families import (
    FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    check,
    corrupt,
    generate,
    solve,
)
from data.world.problems import build_problems, corpus_texts, problem_from_record
from data.world.steps import Problem, Step
from data.world.styles import (
    STUDENT_OPENER,
    STYLES,
    TARGET_STYLES,
    render_concise,
    render_steps,
    render_target,
    render_verbose,
    style_of,
)

__all__ = [
    "FAMILIES",
    "HELDOUT_FAMILIES",
    "STUDENT_OPENER",
    "STYLES",
    "TARGET_STYLES",
    "TRAIN_FAMILIES",
    "Problem",
    "Step",
    "build_problems",
    "check",
    "corpus_texts",
    "corrupt",
    "generate",
    "problem_from_record",
    "render_concise",
    "render_steps",
    "render_target",
    "render_verbose",
    "solve",
    "style_of",
]

"""The built-in reference world, mpd's embedded default: what `make run` trains and measures.

It holds the world's problems (one module per family), its solution styles, its tokenizer,
its models' shapes and the ``bootstrap:`` config section (``world.config``), the recipe that
trains its student and teacher (``world.corpus``, ``world.bootstrap``), and the shipped result
(``world/assets/``, checked by ``world.manifest``). It is built on the library like any user's
code; none of data/, train/, engines/ imports it (tasks/ and flows/ do, to install and run it).

May import: data/, train/, engines/.

Public API (the tokenizer lives in ``world.tokenizer`` and is not
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

from world.families import (
    FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    check,
    corrupt,
    generate,
    solve,
)
from world.problems import build_problems, corpus_texts, problem_from_record
from world.steps import Problem, Step
from world.styles import (
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

"""A stage's declaration: everything the rest of mpd needs to know about it, in one object.

Each ``tasks/<stage>.py`` ends with ``STAGE = Stage(...)``, and ``tasks/registry.py`` lists
them. From the declarations come the CLI's stage choices (``mpd rerun --from``), ``mpd status``'s
rows, each method's round plan (:func:`tasks.registry.round_plan`: a stage runs after what it
reads) and every stage key (:mod:`tasks.stagekey`): a key covers the config the stage declares,
the keys of the stages it reads, its models and their engines' settings, its input files by
content, its code and the library versions of the interpreters that compute it. Nothing of a
key is written by hand in a stage's ``run``: what the declaration leaves out is out of the key,
so a declaration that forgets a config section is a stage that reads nothing of it.

``run(ctx, rnd)`` is the stage's wiring: ``ctx.key(STAGE, rnd)``, then its body on the store
(cached by that key) through ``ctx.run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data.tables import Table
from tasks.common import StageResult
from tasks.context import Context, Recipe, Round

# What a stage reads: stage names, or a function of the method's recipe (score reads the
# method's targets, whichever stage holds them).
Reads = tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]
# The config a stage reads: dotted paths of the run config ("sample", "seed", "rewrite.prompt"),
# or a function of (run config, round) giving {name: value} where what it reads depends on the
# method (score reads the rewrite prompt only when it scores in the rewrite's context).
ConfigParts = tuple[str, ...] | Callable[[Any, Round], dict[str, Any]]
# Roles ("student", "teacher", "rewriter") or module names, or a function of the run config
# giving them.
Roles = tuple[str, ...] | Callable[[Any], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    """One stage of the campaign.

    ``reads``: the stages whose committed output the body reads; their keys are the key's
    inputs, and a round plan runs them first. ``config``: what it reads of the run config, with
    each config model's ``NOT_IN_KEY`` fields left out. ``models``: the roles whose weights it
    loads itself (train: the student, the teacher when online); ``engines``: the roles it runs
    an engine for (their model, the engine's kind and ``SHAPING`` settings, vLLM's interpreter).
    ``files``: the input files it reads, ``cfg -> {name: path}``, hashed by content.
    ``code``: the modules whose closure is its code (default: the module of ``run``).

    ``runs`` says when a round runs it: ``when_read`` (a stage of the plan reads it: sample,
    rewrite, score...), ``every_round`` (always, pulling in what it reads: train, eval), or
    ``beside`` (whenever everything it reads is planned anyway: a report on the samples).
    ``round0``: it also runs in round 0, on the starting student (eval). ``per_round=False``:
    it runs once per campaign, before round 0 (``when(cfg)`` says whether at all).
    ``makes_student``: its output's ``model/`` directory is the round's new student (train).
    """

    name: str
    summary: str
    run: Callable[[Context, Round], StageResult]
    tables: tuple[Table, ...] = ()
    reads: Reads = ()
    config: ConfigParts = ()
    models: Roles = ()
    engines: Roles = ()
    files: Callable[[Any], dict[str, Path | str]] | None = None
    code: Roles = ()
    runs: Literal["when_read", "every_round", "beside"] = "when_read"
    round0: bool = False
    per_round: bool = True
    when: Callable[[Any], bool] | None = None
    makes_student: bool = False

    def reads_for(self, recipe: Recipe) -> tuple[str, ...]:
        """The stages it reads in a round of ``recipe``."""
        return self.reads(recipe) if callable(self.reads) else self.reads

    def config_for(self, cfg: Any, rnd: Round) -> dict[str, Any]:
        """What it reads of the run config ``cfg`` in round ``rnd``, by name."""
        if callable(self.config):
            return self.config(cfg, rnd)
        return {path: config_value(cfg, path) for path in self.config}

    def roles(self, which: Literal["models", "engines"], cfg: Any) -> tuple[str, ...]:
        roles = getattr(self, which)
        return roles(cfg) if callable(roles) else roles

    def code_modules(self, cfg: Any) -> tuple[str, ...]:
        code = self.code(cfg) if callable(self.code) else self.code
        return code or (self.run.__module__,)


def config_value(cfg: Any, path: str) -> Any:
    """The value at a dotted path of the run config (``rewrite.prompt``)."""
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value

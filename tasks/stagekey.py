"""A stage run's key, derived from the stage's declaration: what shapes its output, no more.

The document hashed into the key (shown by ``mpd status --keys``)::

    {"stage": "sample",
     "config": {"sample": {"n": 4, "temperature": 1.0, ...}, "seed": 0, "round": 2},
     "inputs": {"problems": "9f2c…"},                  # keys of the stage runs it reads
     "files": {},                                      # input files by content (sha256)
     "models": {"student": "4be1…"},                   # digest, or the train key that made it
     "dtype": null,                                    # models.dtype where it loads weights itself
     "engines": {"student": {"kind": "vllm", "dtype": "bfloat16", "vllm_args": {}, ...}},
     "code": "0.1.0+ab12cd34ef56",                     # its modules' closure, entry files too
     "libraries": {"python": {"torch": "2.5.1", ...},  # this interpreter's, as its code imports
                   "engine.student": {"vllm": "0.11.0", ...}}}   # vLLM's own interpreter's

Every part comes from the declaration (:class:`tasks.stage.Stage`): ``config`` (each config
model's ``NOT_IN_KEY`` fields left out), ``reads``, ``files``, ``models``/``engines`` (each
engine's kind and its kind's ``SHAPING`` settings, ``engines/config.py``), ``code``. A setting
no declaration names (``runner``, ``engines.*.shard_workers``, timeouts) is in no key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.configbase import key_view
from data.digests import tree_digest
from data.errors import UserError
from data.interpreters import interpreter_versions
from data.keys import closure, code_version, libraries_of, library_versions, stage_key

if TYPE_CHECKING:
    from tasks.context import Context, Round
    from tasks.stage import Stage


@dataclass(frozen=True)
class StageKey:
    """A stage run's key, its code version, and the document the key hashes."""

    key: str
    code: str
    doc: dict[str, Any]


_VERSIONS: dict[tuple[str, ...], dict[str, str]] = {}


def derive(stage: Stage, ctx: Context, rnd: Round) -> StageKey:
    """The key of ``stage`` in round ``rnd`` of campaign ``ctx``."""
    cfg = ctx.cfg
    models, engines = stage.roles("models", cfg), stage.roles("engines", cfg)
    files = {k: Path(v) for k, v in (stage.files(cfg) if stage.files is not None else {}).items()}
    for name, path in files.items():
        if not path.exists():
            raise UserError(f"{stage.name}: its input {name} does not exist: {path}")
    modules = stage.code_modules(cfg)
    code = code_version(*modules)
    doc: dict[str, Any] = {
        "stage": stage.name,
        "config": {k: key_view(v) for k, v in stage.config_for(cfg, rnd).items()},
        "inputs": {s: ctx.read_key(s, rnd, stage.name) for s in stage.reads_for(rnd.recipe)},
        "files": {name: tree_digest(path, ctx.cache) for name, path in sorted(files.items())},
        "models": {role: ctx.role_model(role, rnd).identity for role in (*models, *engines)},
        "dtype": cfg.models.dtype if models else None,
        "engines": {
            role: ctx.engine_config(ctx.engine_role(role, rnd)).key_settings(cfg.models.dtype)
            for role in engines
        },
        "code": code,
        "libraries": libraries(ctx, rnd, modules, engines),
    }
    return StageKey(stage_key(doc), code, doc)


def libraries(
    ctx: Context, rnd: Round, modules: tuple[str, ...], engines: tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """The versions of the libraries that compute the stage: this interpreter's, as far as its
    code imports them, and each engine's own interpreter's (vLLM's environment)."""
    code = closure(*modules)
    dists = libraries_of(code.local)
    if dists not in _VERSIONS:
        _VERSIONS[dists] = library_versions(dists)
    out = {"python": _VERSIONS[dists]}
    for role in engines:
        python = ctx.engine_config(ctx.engine_role(role, rnd)).computing_python()
        if python is not None:
            # what the started entry files import (vllm_worker: vLLM, and what vLLM computes with)
            out[f"engine.{role}"] = interpreter_versions(
                python, libraries_of(code.started), ctx.cache
            )
    return out

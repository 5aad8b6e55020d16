"""The engine pool: one engine per model and role in a process, reused across shards and rounds.

Process-global on purpose: a stage's shards, and the stages of a round that use the same model,
share one loaded engine; a role that moves to another model (each round's new student) closes
the engine it used, so a campaign holds one engine per role, not one per round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.model_fetch import StoredModel, cache_root, stored_model
from engines.config import EngineConfig
from tasks.packaged_fetch import PackagedModel, packaged_model

_ENGINES: dict[tuple[str, str, str], Any] = {}
_ROLES: dict[str, tuple[str, str, str]] = {}  # role -> the key of the engine serving it now


def engine_for(
    cfg: EngineConfig,
    model_path: Path | str,
    *,
    dtype: str,
    device: str,
    journal_dir: Path | str | None = None,
    role: str | None = None,
) -> Any:
    """An engine over ``model_path``, loaded once per process and reused across shards.

    ``journal_dir`` (openai engine only) keeps each call's finished requests, so
    a restarted stage resends only the rest (see ``engines/journal.py``).
    ``role`` (student, teacher, rewriter): when a role moves to another model
    (each round's new student), the engine it used is closed unless another
    role still uses it, so a campaign holds one engine per role, not one per
    round (a vLLM engine per round would fill the GPU by round 2).
    """
    key = (cfg.kind, str(model_path), cfg.model_dump_json() + str(journal_dir))
    if role is not None:
        old = _ROLES.get(role)
        _ROLES[role] = key
        if old is not None and old != key and old not in _ROLES.values() and old in _ENGINES:
            _ENGINES.pop(old).close()
    if key not in _ENGINES:
        if cfg.kind == "vllm":
            # deferred: pulls in torch (train.models): loaded when a stage first asks for this engine
            from engines.vllm import load_vllm_engine

            _ENGINES[key] = load_vllm_engine(model_path, cfg, dtype=cfg.dtype or dtype)
        elif cfg.kind == "openai":
            # deferred: pulls in torch (train.models) and httpx: loaded when a stage asks for it
            from engines.openai import load_openai_engine

            _ENGINES[key] = load_openai_engine(model_path, cfg, journal_dir=journal_dir)
        else:
            # deferred: pulls in torch: loaded when a stage first asks for this engine
            from engines.hf import load_hf_engine

            _ENGINES[key] = load_hf_engine(
                model_path,
                dtype=dtype,
                device=device,
                batch_size=cfg.batch_size,
                max_batch_tokens=cfg.max_batch_tokens,
            )
    return _ENGINES[key]


def close_engines() -> None:
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()
    _ROLES.clear()


@dataclass(frozen=True)
class EngineHandle:
    """An engine by identity: what loads it (model, engine config), not the loaded thing.

    It stands for the engine (attribute access loads it through :func:`engine_for`, once per
    process), so a stage body uses it as an engine; and it pickles small, so a shard sent to a
    Dask worker (``tasks/cluster.py``) carries the handle and the worker loads its own engine.

    What it pickles never holds a path of the flow's host (:meth:`__reduce__`): a model a
    stage made travels as ``stored`` (workspace URL and content key) and the worker fetches
    it into its own cache (:mod:`data.model_fetch`), a ``packaged:`` model as its name and
    content digest, imported by the worker (:mod:`tasks.packaged_fetch`); the openai engine's
    request journal is the worker's own, in its cache. ``path`` travels only for a model outside the workspace
    (a directory the config names): that one must exist on every worker at that path.
    """

    cfg: EngineConfig
    path: str
    dtype: str
    device: str
    journal_dir: str | None = None
    role: str | None = None
    stored: StoredModel | PackagedModel | None = None

    def get(self) -> Any:
        """The engine, loaded in this process on first use and reused after."""
        return engine_for(
            self.cfg,
            self.stored.fetch() if self.stored is not None and not self.path else self.path,
            dtype=self.dtype,
            device=self.device,
            journal_dir=self.journal_dir,
            role=self.role,
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in self.__dataclass_fields__:
            raise AttributeError(name)  # pickling and copying look for dunders: never load
        return getattr(self.get(), name)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """The handle as another process (a Dask worker, maybe on another host) gets it."""
        path, cfg = ("" if self.stored is not None else self.path), self.cfg
        if cfg.kind == "openai" and self.stored is not None and cfg.served_model_name is None:
            # the server knows the model by the flow's path (the default name): a name there,
            # never opened; the worker's tokenizer comes from its fetched copy
            cfg = cfg.model_copy(update={"served_model_name": self.path})
        journal = None
        if self.journal_dir is not None:  # the flow's journal dir names it, never a path there
            journal = hashlib.sha256(self.journal_dir.encode()).hexdigest()[:12]
        args = (cfg, path, self.dtype, self.device, journal, self.role, self.stored)
        return (_unpickled, args)


def _unpickled(
    cfg: EngineConfig,
    path: str,
    dtype: str,
    device: str,
    journal: str | None,
    role: str | None,
    stored: StoredModel | PackagedModel | None,
) -> EngineHandle:
    """A handle in the process that unpickled it: its journal (openai) in this machine's cache.

    Per worker machine, not returned to the flow: a journal only spares a call resending the
    requests that finished before it was interrupted, and a shard interrupted on a worker is
    rerun by Dask on whichever worker lives, where a flow-host file could not be written. The
    rows of a finished shard go back to the flow, which writes them; the journal is then done.
    """
    journal_dir = str(cache_root().parent / "requests" / journal) if journal else None
    return EngineHandle(cfg, path, dtype, device, journal_dir, role, stored)


def stage_engine(ctx: Any, role: str, path: Path | str, *, slot: str | None = None) -> EngineHandle:
    """The engine a stage of campaign ``ctx`` (:class:`tasks.context.Context`) uses for
    ``role`` over ``path``; ``slot`` (default: the role) is what it replaces when the model
    changes: each round's student closes the last round's."""
    ecfg, m = ctx.engine_config(role), ctx.cfg.models
    # a served endpoint keeps finished requests, so a restarted stage resends only the rest
    journal = ctx.store.workspace / ".requests" if ecfg.kind == "openai" else None
    stored = stored_model(ctx.store.workspace, ctx.store.remote, str(path)) or packaged_model(
        ctx.store.workspace, str(path), ctx.cache
    )
    handle = EngineHandle(
        ecfg, str(path), m.dtype, m.device, str(journal) if journal else None, slot or role, stored
    )
    handle.get()  # load now: the role's previous engine is closed before the stage starts
    return handle

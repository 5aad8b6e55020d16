"""Bootstrap stage: the reference world's tokenizer, student and teacher in the workspace.

It runs once per workspace, before the problems, and only when a model is ``builtin:``. Two
sources, one stage (``bootstrap/round=0``, cached by key):

- shipped (default): ``world/assets`` in the repository, verified against its manifest's
  checksums and copied in. Its key is the shipped files' content and the copying code, so a
  re-shipped world is installed anew and an unrelated edit installs nothing;
- from scratch (``mpd bootstrap --from-scratch``, or no shipped world): trained here with the
  config's ``bootstrap`` section; its key is that section, the seed and the training code.

The workspace copy makes a workspace self-contained: move it, and its ``builtin:`` models move
with it. Its table is the world's own evaluation of the installed models.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from data.errors import UserError
from data.store import StageStore
from data.tables import BOOTSTRAP_EVALS
from tasks.common import StageResult
from tasks.context import BUILTIN_MODELS, NO_STUDENT, Context, Round
from tasks.stage import Stage
from world.manifest import check_same_tokenizer_files, copy_assets, verify_assets, write_assets

log = logging.getLogger("mpd")
SHIPPED = Path(__file__).resolve().parents[1] / "world" / "assets"


def bootstrap_assets(
    cfg: Any,
    out: Path,
    *,
    device: str,
    workers: int | None,
    command: str | None,
    sources: dict[str, Path] | None = None,
    parts: tuple[str, ...] = ("student", "teacher"),
) -> dict:
    """Train into an assets directory (what ``world/assets`` is made by): from scratch, or
    from ``sources`` (role -> assets directory): the roles in ``parts`` fine-tuned into the
    config's ``bootstrap`` world, the others copied. The sources' manifests are kept as the
    new one's parents. Rerunning the same command after a kill resumes from the checkpoints."""
    # deferred: pulls in torch and transformers, loaded only when a world is trained
    import world.bootstrap

    parents = {}
    for role, src in (sources or {}).items():
        parents[role] = verify_assets(src)  # AssetsError: one line, exit 2
        if src.resolve() == out.resolve():
            raise UserError(f"{src} is a source of this bootstrap: give an --out other than it")
    if sources is not None:
        check_same_tokenizer_files(sources["student"], sources["teacher"])
    rows, metrics = world.bootstrap.run_bootstrap(
        cfg.bootstrap,
        out,
        seed=cfg.seed,
        device=device,
        workers=workers,
        sources=sources,
        parts=parts,
    )
    command = command or f"mpd bootstrap --from-scratch --out {out} --device {device}"
    config = {"seed": cfg.seed, "bootstrap": cfg.bootstrap.model_dump(mode="json")}
    if sources is not None:
        summary = {r: {k: parents[r][k] for k in ("command", "config", "metrics")} for r in parents}
        if len({p.resolve() for p in sources.values()}) == 1:  # --finetune SRC
            config["parent"], config["finetuned"] = summary["student"], list(parts)
        else:  # --combine: one parent per role
            config["parents"] = summary
    manifest = write_assets(out, rows, metrics, config, command)
    log.info("bootstrap assets in %s: %s", out, metrics)
    return manifest


def shipped() -> bool:
    return (SHIPPED / "MANIFEST.json").is_file()


def ensure_bootstrap(
    store: StageStore,
    cfg: Any,
    *,
    from_scratch: bool = False,
    device: str = "auto",
    workers: int | None = None,
) -> StageResult:
    """The committed bootstrap stage, building it when missing (caller holds the lock)."""
    copy = not from_scratch and shipped()
    stage = STAGE if copy else FROM_SCRATCH
    key = Context(cfg).key(stage, Round(0, NO_STUDENT))
    path = str(store.stage_dir("bootstrap", 0))
    if man := store.lookup("bootstrap", 0, key.key):
        log.info("bootstrap: cached (key %s)", key.key[:12])
        return StageResult("bootstrap", 0, key.key, man.rows, True, 0.0, path)
    # same key: resumes from its training checkpoints
    writer = store.writer("bootstrap", 0, key.key, code_version=key.code)
    started = time.monotonic()
    if copy:
        manifest = copy_assets(SHIPPED, writer.dir)
        source = f"shipped {SHIPPED} ({manifest['command']})"
    else:
        log.info("bootstrap: training the world from scratch on %s", device)
        manifest = bootstrap_assets(cfg, writer.dir, device=device, workers=workers, command=None)
        source = "trained here"
    man = writer.commit({"source": source, "metrics": manifest["metrics"]})
    seconds = time.monotonic() - started
    log.info("bootstrap: %s in %.1fs", source, seconds)
    return StageResult("bootstrap", 0, key.key, man.rows, False, seconds, path)


def run(ctx: Context, rnd: Round) -> StageResult:
    result = ensure_bootstrap(ctx.store, ctx.cfg, device=ctx.cfg.models.device)
    ctx.record(STAGE, rnd, result)
    return result


def uses_builtin(cfg: Any) -> bool:
    """Whether a configured model is the built-in world's (then the world is installed)."""
    m = cfg.models
    return any(name in BUILTIN_MODELS for name in (m.student, m.teacher, m.rewriter))


def world_config(cfg: Any, rnd: Round) -> dict[str, Any]:
    """Nothing of the config shapes a copy of the shipped world; a trained one, its recipe."""
    return {} if shipped() else {"bootstrap": cfg.bootstrap, "seed": cfg.seed}


STAGE = Stage(
    name="bootstrap",
    summary="the reference world's models, installed into the workspace (builtin: models only)",
    run=run,
    tables=(BOOTSTRAP_EVALS,),
    config=world_config,
    files=lambda cfg: {"world": SHIPPED} if shipped() else {},
    # what copies and verifies the shipped files, or what trains the world
    code=lambda cfg: ("world.manifest",) if shipped() else ("tasks.bootstrap",),
    per_round=False,
    when=uses_builtin,
)
# The same stage trained here though a world is shipped (``mpd bootstrap --from-scratch``).
FROM_SCRATCH = dataclasses.replace(
    STAGE, config=("bootstrap", "seed"), files=None, code=("tasks.bootstrap",)
)

"""``mpd bootstrap``: put the reference world's tokenizer, student and teacher in place.

Two sources, one stage (``bootstrap/round=0`` in the workspace, cached by key):
- shipped (default): ``assets/world`` in the repository, verified against its
  manifest's checksums and copied in; it was produced by the command recorded
  in that manifest (and that manifest's ``parent``, for a world fine-tuned from
  an earlier one with ``mpd bootstrap --finetune SRC --out DIR``);
- ``--from-scratch``: trained here with the config's ``bootstrap`` section.
The workspace copy makes a workspace self-contained: move it, and its
``builtin:`` models move with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from data.keys import code_version, stage_key
from data.lock import WorkspaceLock
from data.store import StageStore
from flows.config import REPO_ROOT, RunConfig, dump_config
from tasks.context import resolve_model

log = logging.getLogger("mpd")
SHIPPED = REPO_ROOT / "assets" / "world"


def bootstrap_assets(
    cfg: RunConfig,
    out: Path,
    *,
    device: str,
    workers: int | None,
    command: str | None,
    sources: dict[str, Path] | None = None,
    parts: tuple[str, ...] = ("student", "teacher"),
) -> dict:
    """Train into an assets directory (what ``assets/world`` is made by): from scratch, or
    from ``sources`` (role -> assets directory): the roles in ``parts`` fine-tuned into the
    config's ``bootstrap`` world, the others copied. The sources' manifests are kept as the
    new one's parents. Rerunning the same command after a kill resumes from the checkpoints."""
    import train.bootstrap
    from flows.errors import UserError
    from flows.logs import setup_logging
    from train.assets import check_same_tokenizer_files, verify_assets, write_assets

    setup_logging()
    parents = {}
    for role, src in (sources or {}).items():
        parents[role] = verify_assets(src)  # AssetsError: one line, exit 2
        if src.resolve() == out.resolve():
            raise UserError(f"{src} is a source of this bootstrap: give an --out other than it")
    if sources is not None:
        check_same_tokenizer_files(sources["student"], sources["teacher"])
    rows, metrics = train.bootstrap.run_bootstrap(
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


def bootstrap_key(cfg: RunConfig, from_scratch: bool) -> str:
    import train.bootstrap

    if not from_scratch and (SHIPPED / "MANIFEST.json").is_file():
        from data.keys import directory_digest

        return stage_key("bootstrap", config={"shipped": directory_digest(SHIPPED)})
    return stage_key(
        "bootstrap",
        config=cfg.bootstrap,
        seed=cfg.seed,
        code=code_version(train.bootstrap),
    )


def ensure_bootstrap(
    store: StageStore,
    cfg: RunConfig,
    *,
    from_scratch: bool = False,
    device: str = "auto",
    workers: int | None = None,
) -> Path:
    """The committed bootstrap directory, building it when missing (caller holds the lock)."""
    shipped = not from_scratch and (SHIPPED / "MANIFEST.json").is_file()
    key = bootstrap_key(cfg, from_scratch)
    if store.lookup("bootstrap", 0, key):
        log.info("bootstrap: cached (key %s)", key[:12])
        return store.stage_dir("bootstrap", 0)
    writer = store.writer("bootstrap", 0, key)  # same key: resumes from its training checkpoints
    started = time.monotonic()
    if shipped:
        from train.assets import copy_assets

        manifest = copy_assets(SHIPPED, writer.dir)
        source = f"shipped {SHIPPED} ({manifest['command']})"
    else:
        log.info("bootstrap: training the world from scratch on %s", device)
        manifest = bootstrap_assets(cfg, writer.dir, device=device, workers=workers, command=None)
        source = "trained here"
    writer.commit({"source": source, "metrics": manifest["metrics"]})
    log.info("bootstrap: %s in %.1fs", source, time.monotonic() - started)
    return store.stage_dir("bootstrap", 0)


def bootstrap_workspace(
    cfg: RunConfig, *, from_scratch: bool, device: str, workers: int | None
) -> Path:
    """``mpd bootstrap`` into a workspace, as the Prefect flow ``mpd-bootstrap``."""
    from flows.prefect_env import prefect_env

    prefect_env()
    from prefect import flow

    from flows.logs import setup_logging

    setup_logging()

    @flow(name="mpd-bootstrap")
    def bootstrap_flow(from_scratch: bool, device: str) -> str:
        return str(_bootstrap(cfg, from_scratch=from_scratch, device=device, workers=workers))

    with WorkspaceLock(cfg.workspace):  # taken before Prefect starts: a busy workspace is one line
        return Path(bootstrap_flow(from_scratch, device))


def _bootstrap(cfg: RunConfig, *, from_scratch: bool, device: str, workers: int | None) -> Path:
    from data import catalog
    from data.fsutil import atomic_write_bytes

    atomic_write_bytes(cfg.workspace / "run.yaml", dump_config(cfg).encode())
    store = StageStore(cfg.workspace)
    path = ensure_bootstrap(store, cfg, from_scratch=from_scratch, device=device, workers=workers)
    catalog.write_catalog(cfg.workspace)
    return path


def check_tokenizers(cfg: RunConfig) -> None:
    """Student and teacher must tokenize identically (token-level KL needs it)."""
    from train.models import check_same_tokenizer, load_tokenizer

    student = load_tokenizer(resolve_model(cfg.models.student, cfg.workspace))
    teacher = load_tokenizer(resolve_model(cfg.models.teacher, cfg.workspace))
    check_same_tokenizer(student, teacher)

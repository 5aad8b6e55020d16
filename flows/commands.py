"""What each ``mpd`` sub-command does (``flows/cli.py`` parses the command line and calls one).

Each command loads the config (one line for a mistake), then does its job; a command that
starts Prefect calls ``prefect_env()`` first, and imports what pulls Prefect in after it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from data.catalog import (
    run_query,  # the tables, as declared, and the views made of them
)
from data.lock import WorkspaceLock
from data.objstore import ObjectStore
from data.store import StageStore
from flows.bench_tune import parse_tune
from flows.config import SERVED, ConfigError, RunConfig, dump_config, load_config
from flows.errors import UserError
from flows.logs import setup_logging
from flows.modes import MODES, plan_keys, round_stages
from flows.prefect_env import finish, prefect_env, run_flow
from flows.prefect_server import start_api
from flows.preflight import preflight
from flows.sqlout import check_out_path, format_table, write_parquet_atomic
from flows.status import check_rerun, downstream, last_computed_round, print_keys, print_status
from flows.trusted import owners_run
from train.gguf import import_gguf, packaged_gguf


def _load(args: argparse.Namespace) -> RunConfig:
    # -w is a path taken literally (a URL workspace also sets storage.url), set after --set.
    cfg = load_config(args.config, args.overrides, workspace=getattr(args, "workspace", None))
    if getattr(args, "rounds", None) is not None:
        cfg.rounds = args.rounds
    return cfg


def cmd_import_model(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.gguf is None):
        raise UserError("import-model: name a packaged model (smollm2) or give --gguf FILE")
    setup_logging()
    source = args.gguf if args.gguf is not None else packaged_gguf(args.name)
    info = import_gguf(source, args.out)
    print(
        f"imported {info['architecture']} ({info['parameters'] / 1e6:.1f}M parameters, "
        f"vocabulary {info['vocab_size']}) into {args.out}",
        file=sys.stderr,
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_config(_load(args)))
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    # deferred: pulls in torch (train.models): mpd --help, sql and status start without it
    from flows.bootstrap import bootstrap_assets, bootstrap_workspace

    cfg = _load(args)
    device = args.device or cfg.models.device
    command = shlex.join(["mpd", *sys.argv[1:]])
    if args.finetune is not None and args.combine is not None:
        raise UserError("--finetune and --combine are two ways to start: give one")
    for given, flag in ((args.finetune, "--finetune SRC"), (args.combine, "--combine A B")):
        if given is not None and args.out is None:
            raise UserError(f"{flag} writes an assets directory: give --out DIR")
    if args.only is not None and args.finetune is None:
        raise UserError("--only picks the role --finetune trains: give --finetune SRC")
    if args.out is not None:
        sources, parts = None, ("student", "teacher")
        if args.finetune is not None:
            sources = {"student": args.finetune, "teacher": args.finetune}
            parts = (args.only,) if args.only else parts
        elif args.combine is not None:
            sources, parts = dict(zip(("student", "teacher"), args.combine, strict=True)), ()
        setup_logging()
        bootstrap_assets(
            cfg,
            args.out,
            device=device,
            workers=args.workers,
            command=command,
            sources=sources,
            parts=parts,
        )
    else:
        bootstrap_workspace(
            cfg, from_scratch=args.from_scratch, device=device, workers=args.workers
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # Config, workspace, lock and model mistakes end here, in well under a second: before
    # Prefect is imported and started (seconds; a minute on a loaded machine).
    cfg = _load(args)
    preflight(cfg)
    prefect_env()

    api = start_api()  # starts while the stages load
    # deferred: pulls in Prefect and the stages' libraries, loaded while the API server starts
    from flows.campaign import campaign_flow

    with owners_run():  # the --set items are this command line's: any key (flows/trusted.py)
        state = run_flow(
            lambda: campaign_flow(
                config=str(args.config) if args.config else None,
                rounds=args.rounds,
                workspace=str(args.workspace) if args.workspace else None,
                overrides=args.overrides,
                return_state=True,
            ),
            api,
        )
    return finish(state)


def cmd_bench(args: argparse.Namespace) -> int:
    prefect_env()
    # deferred: pulls in Prefect, which reads its settings at import: after prefect_env()
    from flows.bench import bench_flow, parse_list, parse_positive, plan, tune_plan

    methods = None if args.methods is None else parse_list(args.methods, "methods", list(MODES))
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
        except ValueError:
            raise UserError(f"--seeds expects integers, got {args.seeds!r}") from None
    rounds = parse_positive(args.rounds, "rounds")
    jobs = parse_positive(args.jobs, "jobs")
    overrides = list(args.overrides)
    if jobs is not None:
        overrides.append(f"bench.jobs={jobs}")
    if args.workspace is not None:
        overrides.append(f"workspace={args.workspace}")

    # Every mistake ends here, before Prefect starts.
    base, _ = plan(args.config, overrides, methods, seeds, rounds)
    tune = None if args.tune is None else parse_tune(args.tune)
    if tune is not None:
        tune_plan(args.config, overrides, methods, seeds, rounds, tune)
    preflight(base)

    return finish(
        run_flow(
            lambda: bench_flow(
                config=str(args.config) if args.config else None,
                methods=methods,
                seeds=seeds,
                rounds=rounds,
                overrides=overrides,
                tune=tune,
                return_state=True,
            ),
            start_api(),
        )
    )


def cmd_serve(args: argparse.Namespace) -> int:
    prefect_env()
    # deferred: pulls in Prefect, which reads its settings at import: after prefect_env()
    from flows.serve import nightly_schedule, serve_nightly

    # Config errors end here, before anything is registered; and what the served deployment's
    # runs will refuse (they are anyone's to start, flows/trusted.py) is refused now.
    load_config(args.config, args.overrides, workspace=args.workspace, labels=SERVED)
    try:
        nightly_schedule(args.cron, args.timezone)
    except ValueError as exc:  # a bad cron string or time zone
        raise ConfigError(f"--cron {args.cron!r} --timezone {args.timezone!r}: {exc}") from None
    serve_nightly(
        config=str(args.config) if args.config else None,
        rounds_per_night=args.rounds_per_night,
        cron=args.cron,
        timezone=args.timezone,
        workspace=str(args.workspace) if args.workspace else None,
        overrides=args.overrides,
    )
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    cfg = _load(args)
    path = preflight(cfg)
    check_rerun(args.round_, cfg.rounds, path, name=cfg.storage.url)  # before anything changes
    with WorkspaceLock(cfg.workspace):
        store = StageStore(cfg.workspace)
        gone = [
            f"{s} r{r}"
            for r, s in downstream(args.round_, args.stage, cfg.rounds, round_stages(cfg))
            if store.invalidate(s, r)
        ]
    print(f"invalidated: {', '.join(gone) or 'nothing (not computed yet)'}", file=sys.stderr)
    # A rerun recomputes: it must not adopt the same stages back from a cache_from workspace.
    args.overrides = [*args.overrides, "cache_from=[]"]
    return cmd_run(args)


def cmd_status(args: argparse.Namespace) -> int:
    def last_round(ws: Path | ObjectStore) -> int:
        return last_computed_round(ws) or 0

    cfg = _load(args)
    workspace: Path | ObjectStore = cfg.workspace
    if cfg.storage.url:  # read where it is: an analyst's machine has no local copy
        workspace = store = _object_store(cfg)
        if not store.fs.exists(store.root):
            raise UserError(f"workspace {store.url} holds nothing (nothing has run there yet?)")
    elif not Path(cfg.workspace).is_dir():
        raise UserError(f"workspace {cfg.workspace} does not exist (nothing has run there yet?)")
    if args.keys:  # the rounds computed and the next, as status shows them
        print_keys(workspace, plan_keys(cfg, min(cfg.rounds, last_round(workspace) + 1)))
    else:
        print_status(workspace, cfg.rounds, round_stages(cfg), deep=args.verify)
    return 0


def _object_store(cfg: RunConfig) -> ObjectStore:
    """The object store of a URL workspace, checked to answer (one line if not)."""
    store = ObjectStore(str(cfg.storage.url), cfg.storage.options)
    store.check_reachable()
    return store


def cmd_sql(args: argparse.Namespace) -> int:
    cfg = _load(args)
    workspace = cfg.workspace
    if args.out is not None:
        check_out_path(args.out, workspace)  # before a long query, not after it
    source = _object_store(cfg) if cfg.storage.url else workspace
    out = args.out
    try:
        result = run_query(
            source,
            args.query,
            timeout_s=args.timeout or None,
            # streamed into the file as DuckDB produces it, never whole in memory
            sink=None if out is None else lambda reader: write_parquet_atomic(reader, out),
        )
    except KeyboardInterrupt:
        print("mpd: query interrupted; nothing was written", file=sys.stderr)
        return 130
    if out is not None:
        print(f"wrote {result} rows to {out}", file=sys.stderr)
    else:
        sys.stdout.write(format_table(result, args.format).rstrip("\n") + "\n")
    return 0

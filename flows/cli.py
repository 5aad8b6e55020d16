"""The ``mpd`` command line: one entry point, one sub-command per job (what each does:
``flows/commands.py``).

Heavy imports (torch, prefect, duckdb) happen inside the sub-command that needs
them, so ``mpd --help`` and config errors answer instantly. Every error a user
can cause (a bad config key, a busy workspace, a refused SQL statement, a bad
problems file) is printed as one line, exit code 2, never a traceback; a
traceback means a bug in mpd.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from data.catalog import (
    views,  # the tables, as declared, and the views made of them
)
from data.errors import kind_of, one_line
from flows.commands import (
    cmd_bench,
    cmd_bootstrap,
    cmd_config_show,
    cmd_import_model,
    cmd_rerun,
    cmd_run,
    cmd_serve,
    cmd_sql,
    cmd_status,
)
from flows.stopping import stoppable
from tasks.registry import per_round_stages  # the stages a round can have, as declared
from train.gguf import PACKAGED

EXAMPLES = """examples:
  mpd run                                 bootstrap and run the default campaign (configs/tiny.yaml)
  mpd run -c configs/tiny.yaml --rounds 4 continue the campaign to round 4
  mpd config show --set train.lr=1e-4     the resolved config, with an override
  mpd status                              every (round, stage): done / partial / corrupt
  mpd serve --rounds-per-night 1          one more round every night at 02:00 UTC
  mpd sql "select * from round_summary"   read-only SQL over every table
  mpd bench --methods mpd,on_policy       methods side by side: bench.md, .parquet, .png
"""


def _add_config_args(p: argparse.ArgumentParser, default: str = "configs/tiny.yaml") -> None:
    p.add_argument("-c", "--config", type=Path, help=f"run config YAML (default {default})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _add_workspace_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "-w",
        "--workspace",
        help="workspace directory or object-storage URL, e.g. s3://bucket/prefix (overrides "
        "config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpd",
        description="Mixed-Policy Distillation: make a small reasoning model think in fewer "
        "tokens, in cached, resumable rounds whose data you can query in SQL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the campaign (every stage cached and resumable)")
    _add_workspace_args(p)
    p.add_argument("--rounds", type=_count, help="run up to this round (overrides config)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench",
        help="run every method from the same student with the same budget, side by side",
        description="Runs each method (flows/modes.py) as a campaign in its own workspace "
        "under the config's workspace (the bench root), sharing the stages they have in common, "
        "then writes bench.md, bench.parquet and bench.png there. Default config: "
        "configs/bench.yaml (every method on seeds 0, 1, 2; docs/bench.md).",
    )
    _add_config_args(p, default="configs/bench.yaml")
    p.add_argument("-w", "--workspace", type=Path, help="bench root (overrides config)")
    p.add_argument(
        "--methods",
        help="comma-separated, default all: mpd,on_policy,off_policy,self_distill,"
        "sft_compressed,truncation,self_train,mpd_unfiltered",
    )
    p.add_argument("--rounds", help="rounds per method (default: the config's)")
    p.add_argument(
        "--seeds",
        help="comma-separated seeds every method runs with (default: the config's bench.seeds, "
        "0,1,2)",
    )
    p.add_argument(
        "--jobs",
        help="campaigns run side by side, each in its own process (default: the config's "
        "bench.jobs; configs/bench.yaml: 2). Each gets OMP_NUM_THREADS = cores / jobs unless set",
    )
    p.add_argument(
        "--tune",
        metavar="lr=GRID",
        help="choose each method's learning rate on the dev split first, from the same grid "
        "for every method (e.g. lr=1e-5,3e-5,1e-4; needs problems.n_dev or dev_fraction), "
        "then run the bench on test once (docs/bench.md)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bootstrap",
        help="build the reference world: tokenizer, student and teacher",
        description="Without --from-scratch the shipped models (world/assets) are verified and "
        "installed into the workspace; --from-scratch trains them (minutes on a GPU, many hours "
        "on a CPU). With --out DIR the result is written as an assets directory instead. "
        "--finetune SRC --out DIR fine-tunes the models of the assets in SRC into the config's "
        "bootstrap world (how the shipped world was made on a 2-core CPU: about 40 minutes for "
        "the student, 3 hours for the teacher), keeping SRC's tokenizer; --only picks one role, "
        "and --combine STUDENT_SRC TEACHER_SRC puts roles trained apart together. Training "
        "writes checkpoints: the same command, rerun after a kill, resumes.",
    )
    _add_workspace_args(p)
    p.add_argument("--from-scratch", action="store_true", help="train instead of using shipped")
    p.add_argument("--out", type=Path, help="write an assets directory here (implies training)")
    p.add_argument(
        "--finetune",
        type=Path,
        metavar="SRC",
        help="with --out: start from the assets in SRC and fine-tune their models",
    )
    p.add_argument(
        "--only",
        choices=["student", "teacher"],
        help="with --finetune: fine-tune this role only, copy the other unchanged",
    )
    p.add_argument(
        "--combine",
        type=Path,
        nargs=2,
        metavar=("STUDENT_SRC", "TEACHER_SRC"),
        help="with --out: the student (and tokenizer) of one assets directory and the teacher "
        "of another, evaluated together (roles fine-tuned apart, e.g. on two cores)",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: models.device)")
    p.add_argument("--workers", type=int, default=None, help="processes generating data")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser(
        "import-model",
        help="import a GGUF model (the packaged SmolLM2, or a file) as a model directory",
        description="Writes OUT: the model's weights in float32 safetensors, its tokenizer and "
        "chat template, and IMPORT.json. Use OUT as models.student / models.teacher.",
    )
    p.add_argument(
        "name", nargs="?", choices=sorted(PACKAGED), help="a model packaged with a GGUF file"
    )
    p.add_argument("--gguf", type=Path, help="a GGUF file instead of a packaged model")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.set_defaults(func=cmd_import_model)

    p = sub.add_parser("config", help="show the resolved run config")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the config with every default filled in")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "rerun",
        help="recompute one stage of one round and everything downstream",
        description="Moves the committed output of STAGE in round R, the later stages of round R "
        "and every later round aside, then runs the campaign: only those are recomputed.",
    )
    _add_workspace_args(p)
    p.add_argument("--round", dest="round_", type=_count, required=True, help="round to redo from")
    p.add_argument(
        "--from",
        dest="stage",
        required=True,
        choices=per_round_stages(),
        help="the stage to redo (its later stages in the method's plan follow)",
    )
    p.add_argument("--rounds", type=_count, help="run up to this round (overrides config)")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser(
        "serve",
        help="run the campaign nightly from this process (no work pool, no worker)",
        description="Registers the nightly-compression deployment with the Prefect API "
        "(PREFECT_API_URL, e.g. a `prefect server start`) and runs its scheduled runs here until "
        "interrupted. Each run continues the campaign: it reaches the rounds already committed in "
        "the workspace plus --rounds-per-night. prefect.yaml declares the same schedule for a "
        "work pool and workers instead.",
    )
    _add_workspace_args(p)
    p.add_argument(
        "--rounds-per-night",
        type=_positive_int,
        default=1,
        metavar="N",
        help="rounds each night adds to the workspace (default 1)",
    )
    p.add_argument(
        "--cron", default="0 2 * * *", help='when to run, a cron string (default "0 2 * * *")'
    )
    p.add_argument(
        "--timezone",
        default="UTC",
        help="IANA time zone of --cron, e.g. Europe/Paris (default UTC)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show the state of every (round, stage) in a workspace")
    _add_workspace_args(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every committed file (sha256): finds damage that kept a file's size",
    )
    p.add_argument(
        "--keys",
        action="store_true",
        help="show each (round, stage)'s key under this config and what went into it: config, "
        "inputs, files, models, engines, code, library versions of the computing interpreters",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "sql",
        help="run a read-only SQL query over the workspace's tables",
        description=f"Read-only DuckDB SQL over the views {', '.join(views())} (in a "
        "bench root: the same stacked with method and seed columns, and bench). One statement, "
        "run in DuckDB's sandbox: it reads the workspace's committed files and nothing else. "
        "Statements that write files, attach databases, load extensions or change settings are "
        "refused. "
        "A stage run whose files are missing or damaged is left out, with a warning naming it. "
        "Ctrl-C stops a running query (exit 130).",
    )
    _add_workspace_args(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=SQL_TIMEOUT_S,
        metavar="SECONDS",
        help=f"stop a query that runs longer (default {SQL_TIMEOUT_S:g}; 0 = no limit)",
    )
    p.add_argument("--out", type=Path, help="write the result to FILE.parquet instead")
    p.add_argument("query", help='e.g. "select round, accuracy from round_summary"')
    p.set_defaults(func=cmd_sql)
    return parser


SQL_TIMEOUT_S = 300.0  # long enough for any query on a night's rounds, short enough to notice


def _seconds(text: str) -> float:
    """argparse type for a duration in seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more seconds, got {text}")
    return value


def _int_at_least(minimum: int, bound: str) -> Callable[[str], int]:
    """argparse type for an integer >= ``minimum`` (a usage error, not a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


STOPPABLE = {"run", "rerun", "bench"}  # the commands that run a campaign (flows/stopping.py)
_count = _int_at_least(0, "0 or more")  # a round number or count
_positive_int = _int_at_least(1, "at least 1")


def main(argv: list[str] | None = None) -> int:
    import os

    # transformers' "Loading weights" bar on every model load drowns the stage logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.command not in STOPPABLE:
            return func(args)

        with stoppable():  # SIGTERM / SIGINT: stopped in seconds, exit 143 / 130
            return func(args)
    except KeyboardInterrupt:
        print(
            "mpd: interrupted; finished shards are kept and reused by the next run", file=sys.stderr
        )
        return 130
    except Exception as exc:  # boundary: the CLI's exit, by the failure's kind
        kind = kind_of(exc)
        if kind == "bug":
            raise  # a bug: its traceback and a non-zero exit
        # A user mistake (exit 2) or a transient failure that outlived its retries (exit 1).
        print(f"mpd: error: {one_line(exc)}", file=sys.stderr)
        return 2 if kind == "user" else 1


if __name__ == "__main__":
    sys.exit(main())

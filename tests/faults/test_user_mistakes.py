"""Every user mistake is one line and exit 2, with no traceback, and writes nothing it should not.

One table of (case, command, expected text): a new case is one line. Each runs the real `mpd`
command in a scratch directory holding the files the table names (``FILES``); none of them gets
as far as starting Prefect, so a row costs about a second. The kill -9 / corruption cases of the
round DAG live in ``tests/test_campaign.py`` (they need a computed campaign); the storage faults
SQL and `mpd status` must survive are in ``test_storage_faults.py`` beside this file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FILES = {
    "badtype.yaml": "train: {lr: fast}\n",
    "badyaml.yaml": "train: [1\n",
    "list.yaml": "- a\n",
    "typo.yaml": "train: {lrr: 1.0e-4}\n",
    "afile": "not a directory\n",
    "problems.txt": "not jsonl\n",
    "ws/.keep": "",
}
SLOW = "select sum(a.range * b.range) from range(100000) a, range(100000) b"

# (case id, argv, text the one error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("config file missing", ["config", "show", "-c", "nope.yaml"], "config file not found"),
    ("config wrong type", ["config", "show", "-c", "badtype.yaml"], "'train.lr'"),
    ("config bad yaml", ["config", "show", "-c", "badyaml.yaml"], "not valid YAML"),
    ("config not a mapping", ["config", "show", "-c", "list.yaml"], "expected a mapping"),
    ("config misspelt key", ["config", "show", "-c", "typo.yaml"], "did you mean 'train.lr'"),
    ("--set without =", ["config", "show", "--set", "train.lr"], "expects key=value"),
    ("--set empty key", ["config", "show", "--set", "=3"], "expects key=value"),
    ("--set not an int", ["config", "show", "--set", "rounds=abc"], "valid integer"),
    ("--set bad choice", ["config", "show", "--set", "train.loss=xx"], "'reverse_kl'"),
    ("--set out of range", ["config", "show", "--set", "sample.temperature=-1"], "greater than"),
    ("--set empty path", ["config", "show", "--set", "workspace="], "'workspace'"),
    ("openai engine without url", ["config", "show", "--set", "engines.student.kind=openai"],
     "needs base_url"),
    ("run --rounds -1", ["run", "--rounds", "-1"], "must be 0 or more"),
    ("rerun --round -1", ["rerun", "--round", "-1", "--from", "filter"], "must be 0 or more"),
    ("rerun unknown stage", ["rerun", "--round", "1", "--from", "nope"], "invalid choice"),
    ("workspace is a file", ["run", "-w", "afile"], "is a file"),
    ("workspace under a file", ["run", "-w", "afile/ws"], "a file: give a directory"),
    ("workspace cannot be made", ["run", "-w", "/proc/1/mpd-ws"], "cannot create workspace"),
    ("student path missing", ["run", "-w", "ws", "--set", "models.student=/no/model"],
     "model path does not exist"),
    ("teacher path is a file", ["run", "-w", "ws", "--set", "models.teacher=afile"],
     "not a directory"),
    ("filter sql missing", ["run", "-w", "ws", "--set", "filter.sql=nope.sql"],
     "filter.sql: file not found"),
    ("problem file missing", ["run", "-w", "ws", "--set", "problems.source=file",
                              "--set", "problems.file.path=nope.jsonl"], "problem source not found"),
    ("bench unknown method", ["bench", "--methods", "nope"], "unknown method 'nope'"),
    ("bench bad seeds", ["bench", "--seeds", "a"], "--seeds expects integers"),
    ("bench zero rounds", ["bench", "--rounds", "0"], "at least 1"),
    ("bench workspace is a file", ["bench", "-w", "afile"], "is a file"),
    ("status of no workspace", ["status", "-w", "nowhere"], "does not exist"),
    ("sql in no workspace", ["sql", "-w", "nowhere", "select 1"], "does not exist"),
    ("sql empty", ["sql", "-w", "ws", ""], "empty query"),
    ("sql syntax", ["sql", "-w", "ws", "selec 1"], "syntax error"),
    ("sql writes a file", ["sql", "-w", "ws", "copy (select 1) to 'x.csv'"], "--out"),
    ("sql changes a setting", ["sql", "-w", "ws", "set threads = 1"], "refused"),
    ("sql unknown table", ["sql", "-w", "ws", "select * from nope"], "nope"),
    ("sql --out not parquet", ["sql", "-w", "ws", "--out", "x.csv", "select 1"], ".parquet"),
    ("sql --out under a file", ["sql", "-w", "ws", "--out", "afile/x.parquet", "select 1"],
     "is a file"),
    ("sql --out into a stage", ["sql", "-w", "ws", "--out", "ws/sample/round=1/part-00000.parquet",
                                "select 1"], "which mpd owns"),
    ("sql --timeout negative", ["sql", "-w", "ws", "--timeout", "-1", "select 1"], "--timeout"),
    ("sql past its timeout", ["sql", "-w", "ws", "--timeout", "0.5", SLOW], "ran past 0.5 s"),
    ("serve bad cron", ["serve", "--cron", "bad cron"], "Invalid cron"),
    ("bootstrap --only alone", ["bootstrap", "--only", "student"], "give --finetune SRC"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_exit_2(tmp_path: Path, argv: list[str], expected: str) -> None:
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "prefect" not in out.stderr.lower(), out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert expected in last, out.stderr
    assert len(last) < 300
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # A refusal writes nothing, except the workspace directory a run creates to check it.
    assert [p for p in after if p not in before and p.parts[0] != "ws"] == [], after

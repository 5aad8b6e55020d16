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

FILES: dict[str, str | bytes] = {
    "badtype.yaml": "train: {lr: fast}\n",
    "badyaml.yaml": "train: [1\n",
    "list.yaml": "- a\n",
    "typo.yaml": "train: {lrr: 1.0e-4}\n",
    "afile": "not a directory\n",
    "problems.txt": "not jsonl\n",
    "ws/.keep": "",
    # strict config text (flows/configfile.py)
    "dup.yaml": "train:\n  lr: 1.0e-4\ntrain:\n  steps: 5\n",
    "dupnested.yaml": "sample:\n  n: 2\n  temperature: 0.5\n  n: 3\n",
    "dupbase.yaml": "base: dup.yaml\nseed: 1\n",
    "inf.yaml": "rounds: 1\ntrain:\n  lr: .inf\n",
    "listsection.yaml": "train: [1, 2]\n",
    "latin1.yaml": "train:\n  loss: caf\xe9\n".encode("latin-1"),
    "deep.yaml": "x: " + "[" * 2000 + "]" * 2000 + "\n",
    "selfalias.yaml": "storage:\n  options: &x {a: *x}\n",
    "aliasbomb.yaml": "storage:\n  options:\n    a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"    {n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, n in zip("abcde", "bcdef", strict=True)
    ),
    # problem files (data/sources.py), checked before Prefect starts
    "empty.jsonl": "",
    "blank.jsonl": "\n\n  \n",
    "dupids.jsonl": '{"id": "a", "prompt": "p1", "answer": "1"}\n'
    '{"id": "b", "prompt": "p2", "answer": "2"}\n{"id": "a", "prompt": "p3", "answer": "3"}\n',
    "noanswer.jsonl": '{"prompt": "p1", "answer": "1"}\n{"prompt": "p2"}\n',
    "nullanswer.jsonl": '{"prompt": "p1", "answer": null}\n',
    "emptyprompt.jsonl": '{"prompt": "p1", "answer": "1"}\n{"prompt": " ", "answer": "2"}\n',
    "latin1.jsonl": '{"prompt": "p1", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n'.encode(
        "latin-1"
    ),
    "utf16.jsonl": '{"prompt": "p1", "answer": "1"}\n'.encode("utf-16"),
    "badjson.jsonl": '{"prompt": "p1", "answer": "1"}\n{"prompt": "p2", "answer": \n',
    "nanjson.jsonl": '{"prompt": "p1", "answer": NaN}\n',
    "array.jsonl": '["p1", "1"]\n',
    "nogold.jsonl": '{"prompt": "p1", "answer": "so it is 4"}\n',
    "badsplit.jsonl": '{"prompt": "p1", "answer": "1", "split": "trian"}\n',
    "column.jsonl": '{"question": "p1", "answer": "1"}\n',
    "bad.parquet": "not parquet at all\n",
    "noparquet/readme.txt": "no data here\n",
}
SLOW = "select sum(a.range * b.range) from range(100000) a, range(100000) b"


def show(*args: str) -> list[str]:
    """``mpd config show`` with ``args``: a config mistake ends there as in every command."""
    return ["config", "show", *args]


def problems(path: str, *file_keys: str) -> list[str]:
    """``mpd run`` in a workspace that does not exist yet, on the problem file ``path``."""
    sets = [f"problems.file.path={path}", *(f"problems.file.{k}" for k in file_keys)]
    return ["run", "-w", "newws", "--set", "problems.source=file",
            *(a for kv in sets for a in ("--set", kv))]  # fmt: skip


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
    ("rerun in a workspace never run", ["rerun", "-w", "ws", "--round", "99", "--from", "filter"],
     "nothing computed yet"),
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
    ("-w taken literally, not as YAML", ["status", "-w", "runs/a #1"],
     "workspace runs/a #1 does not exist"),
    ("-w that YAML reads as a list", ["status", "-w", "[x]"], "workspace [x] does not exist"),
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
    # -- strict config: refused in one line that names where the value came from (issue 26)
    ("config duplicate section", show("-c", "dup.yaml"),
     "dup.yaml:3: duplicate key 'train' (first at line 1)"),
    ("config duplicate nested key", show("-c", "dupnested.yaml"),
     "dupnested.yaml:4: duplicate key 'sample.n' (first at line 2)"),
    ("config duplicate key in base", show("-c", "dupbase.yaml"), "dup.yaml:3: duplicate key"),
    ("--set duplicate key", show("--set", "train={lr: 1, lr: 2}"), "duplicate key 'train.lr'"),
    ("--set inf", show("--set", "train.lr=inf"),
     "--set train.lr=inf: 'train.lr': Input should be a finite number"),
    ("--set -inf", show("--set", "train.lr=-.inf"), "--set train.lr=-.inf: 'train.lr'"),
    ("--set overflowing float", show("--set", "train.lr=1.0e+400"), "not a finite number"),
    ("config .inf", show("-c", "inf.yaml"), "inf.yaml:3: 'train.lr': .inf is not a finite"),
    ("--set nan in a free mapping", show("--set", "storage.options={a: .nan}"),
     "'storage.options.a': .nan is not a finite number"),
    ("--set inf in engine args", show("--set", "engines.student.vllm_args={x: {y: .inf}}"),
     "'engines.student.vllm_args.x.y'"),
    ("--set huge integer", show("--set", "seed=100000000000000000000000"), "64 bits"),
    ("--set huge integer in a list", show("--set", "bench.seeds=[1.0e+30]"),
     "--set bench.seeds=[1.0e+30]: 'bench.seeds"),
    ("--set negative seed", show("--set", "seed=-1"),
     "--set seed=-1: 'seed': Input should be greater than or equal to 0"),
    ("--set wrong value named", show("--set", "rounds=abc"), "--set rounds=abc: 'rounds'"),
    ("--set through a scalar", show("--set", "train.beta.x=1"),
     "--set train.beta.x=1: train.beta is not a section"),
    ("--set empty key part", show("--set", "train..lr=1"), "expects key=value"),
    ("config value named by line", show("-c", "badtype.yaml"), "badtype.yaml:1: 'train.lr'"),
    ("config list for a section", show("-c", "listsection.yaml"),
     "listsection.yaml:1: 'train': Input should be a valid dictionary"),
    ("config not UTF-8", show("-c", "latin1.yaml"),
     "latin1.yaml:2: not UTF-8 text (byte 0xe9 at offset 18)"),
    ("config nested too deep", show("-c", "deep.yaml"), "nested more than 64 levels deep"),
    ("config alias in itself", show("-c", "selfalias.yaml"),
     "selfalias.yaml:2: an alias refers to a value that contains it"),
    ("config alias bomb", show("-c", "aliasbomb.yaml"), "more than 100000 values"),
    # -- the problem file: every rule of the problems stage, before Prefect starts
    ("problem file empty", problems("empty.jsonl"), "empty.jsonl: no rows"),
    ("problem file blank lines", problems("blank.jsonl"), "blank.jsonl: no rows"),
    ("problem duplicate ids", problems("dupids.jsonl", "id_column=id"),
     "duplicate id 'a' in 'id' (id_column) at line 1 and line 3"),
    ("problem missing answer", problems("noanswer.jsonl"),
     "1 of 2 row(s) have a missing, null or empty 'answer' (answer_column); first at line 2"),
    ("problem null answer", problems("nullanswer.jsonl"), "null or empty 'answer'"),
    ("problem empty prompt", problems("emptyprompt.jsonl"),
     "null or empty 'prompt' (prompt_column); first at line 2"),
    ("problem file latin-1", problems("latin1.jsonl"),
     "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at byte offset 47 of the file)"),
    ("problem file utf-16", problems("utf16.jsonl"), "utf16.jsonl:1: not UTF-8 text (byte 0xff"),
    ("problem invalid JSON line", problems("badjson.jsonl"), "badjson.jsonl:2: malformed JSON"),
    ("problem NaN literal", problems("nanjson.jsonl"), "nanjson.jsonl:1: malformed JSON"),
    ("problem line not an object", problems("array.jsonl"), "expected one JSON object per line"),
    ("problem gsm8k without ####", problems("nogold.jsonl", "answer_format=gsm8k"),
     "no gold answer in 'answer'"),
    ("problem unknown split", problems("badsplit.jsonl", "split_column=split"), "'trian'"),
    ("problem column misspelt", problems("column.jsonl"),
     "column 'prompt' (prompt_column) not found; available: question, answer"),
    ("problem parquet unreadable", problems("bad.parquet"), "cannot read Parquet"),
    ("problem directory without data", problems("noparquet"), "nor .parquet files"),
    ("problem hub dataset offline", problems("openai/gsm8k", "format=hf_dataset", "name=main"),
     "the Hugging Face hub is switched off here (HF_"),
    ("bench problem file", ["bench", "-w", "newws", "--rounds", "1", "--methods", "mpd",
                            "--set", "problems.source=file",
                            "--set", "problems.file.path=dupids.jsonl",
                            "--set", "problems.file.id_column=id"], "duplicate id 'a'"),
    ("rerun problem file",
     ["rerun", "--round", "1", "--from", "filter", *problems("empty.jsonl")[1:]],
     "no rows"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_exit_2(tmp_path: Path, argv: list[str], expected: str) -> None:
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
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
    # A refusal writes nothing: not a file, not even the workspace directory (every check runs
    # before anything is created; the rows that run in a new workspace use `-w newws`).
    assert [p for p in after if p not in before] == [], after

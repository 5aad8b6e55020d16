"""User problem sources: every format, column mapping, splits, and every error.

Each error test asserts the type and the words a user needs to fix the file
(the column, the available names, the suggestion, the line or row number).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data.schemas import PROBLEMS
from data.sources import (
    ProblemSourceConfig,
    ProblemSourceError,
    check_problem_source,
    load_problems,
)
from tests.conftest import FULL_GSM8K, GSM8K_FIXTURE, REPO, free_port, needs_full_gsm8k

ROWS = [{"question": f"What is {i} + {i}?", "solution": 2 * i, "uid": f"q{i}"} for i in range(40)]
MAPPED = {"prompt_column": "question", "answer_column": "solution"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the hub: load_from_disk must work offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path, seed: int = 0, **kw: object) -> list[dict]:
    return load_problems(ProblemSourceConfig(path=str(path), **kw), seed)


def error(path: Path, **kw: object) -> str:
    with pytest.raises(ProblemSourceError) as info:
        load(path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- formats ---------------------------------------------------------------


def test_jsonl_records_and_defaults(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arith.jsonl", [{"prompt": "1+1?", "answer": " 2 "}])
    (rec,) = load(path)
    assert rec["family"] == "arith"
    assert rec["problem_id"].startswith("arith-000000-") and len(rec["problem_id"]) == 21
    assert rec | {"problem_id": None} == {
        "problem_id": None,
        "family": "arith",
        "split": rec["split"],
        "difficulty": 0,
        "prompt": "1+1?",
        "answer": "2",
        "source": str(path),
    }
    assert rec["split"] in {"train", "test"}
    table = pa.Table.from_pylist([{"round": 0, **rec}], schema=PROBLEMS)
    assert table.num_rows == 1


def test_jsonl_column_mapping_ids_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n  \n", encoding="utf-8")
    recs = load(path, id_column="uid", family="mine", **MAPPED)
    assert [r["problem_id"] for r in recs] == ["q0", "q1", "q2"]
    assert [r["answer"] for r in recs] == ["0", "2", "4"]  # numbers become text
    assert {r["family"] for r in recs} == {"mine"}


def test_parquet_file_and_directory_agree(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "one.parquet")
    directory = tmp_path / "many"
    (directory / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 25), directory / "part-00000.parquet")
    pq.write_table(table.slice(25), directory / "sub" / "part-00001.parquet")
    pq.write_table(table.slice(0, 1), directory / ".hidden.parquet")  # ignored
    (directory / "_manifest.json").write_text("{}")  # ignored
    one = load(tmp_path / "one.parquet", **MAPPED)
    many = load(directory, **MAPPED)
    assert len(one) == len(many) == 40
    assert [r["prompt"] for r in one] == [r["prompt"] for r in many]
    assert [r["split"] for r in one] == [r["split"] for r in many]
    assert {r["family"] for r in many} == {"many"}


def test_parquet_limit_reads_first_rows(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    recs = load(tmp_path / "p.parquet", limit=5, **MAPPED)
    assert [r["prompt"] for r in recs] == [r["question"] for r in ROWS[:5]]


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "gsm"))
    recs = load(tmp_path / "gsm", id_column="uid", **MAPPED)
    assert len(recs) == 40 and recs[3]["problem_id"] == "q3" and recs[3]["answer"] == "6"
    assert recs[0]["family"] == "gsm"
    assert {r["split"] for r in recs} == {"train", "test"}  # hash split


def test_hf_dataset_dict_splits(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:30]),
            "validation": datasets.Dataset.from_list(ROWS[30:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = load(tmp_path / "dd", format="hf_disk", id_column="uid", **MAPPED)
    assert [r["split"] for r in recs] == ["train"] * 30 + ["test"] * 10
    one = load(tmp_path / "dd", split="validation", test_fraction=0.0, **MAPPED)
    assert len(one) == 10 and {r["split"] for r in one} == {"train"}
    assert one[0]["prompt"] == ROWS[30]["question"]
    limited = load(tmp_path / "dd", limit=32, **MAPPED)
    assert [r["split"] for r in limited] == ["train"] * 30 + ["test"] * 2


def test_hf_dataset_dict_errors(tmp_path: Path) -> None:
    import datasets

    part = datasets.Dataset.from_list(ROWS[:4])
    datasets.DatasetDict({"train": part, "other": part}).save_to_disk(str(tmp_path / "dd"))
    msg = error(tmp_path / "dd", **MAPPED)
    assert "'other'" in msg and "set split" in msg
    msg = error(tmp_path / "dd", split="test", **MAPPED)
    assert "split 'test' not found" in msg and "train, other" in msg
    datasets.DatasetDict({"train": part}).save_to_disk(str(tmp_path / "only_train"))
    hashed = load(tmp_path / "only_train", test_fraction=0.5, **MAPPED)
    assert {r["split"] for r in hashed} == {"train", "test"}  # one split: hash split
    datasets.DatasetDict({}).save_to_disk(str(tmp_path / "no_splits"))
    assert "no rows" in error(tmp_path / "no_splits", **MAPPED)
    part.save_to_disk(str(tmp_path / "single"))
    assert "not a DatasetDict" in error(tmp_path / "single", split="train", **MAPPED)


# --- splits ----------------------------------------------------------------


def test_hash_split_is_deterministic_and_order_free(tmp_path: Path) -> None:
    rows = [{"prompt": f"problem {i}", "answer": "1"} for i in range(2000)]
    a = load(write_jsonl(tmp_path / "a.jsonl", rows), seed=7, test_fraction=0.2)
    b = load(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), seed=7, test_fraction=0.2)
    split_a = {r["prompt"]: r["split"] for r in a}
    assert split_a == {r["prompt"]: r["split"] for r in b}
    assert a == load(tmp_path / "a.jsonl", seed=7, test_fraction=0.2)
    share = sum(s == "test" for s in split_a.values()) / len(rows)
    assert 0.17 < share < 0.23
    other_seed = load(tmp_path / "a.jsonl", seed=8, test_fraction=0.2)
    assert [r["split"] for r in other_seed] != [r["split"] for r in a]
    assert {r["split"] for r in load(tmp_path / "a.jsonl", test_fraction=0.0)} == {"train"}
    assert {r["split"] for r in load(tmp_path / "a.jsonl", test_fraction=1.0)} == {"test"}


def test_split_column_names(tmp_path: Path) -> None:
    names = ["train", "Test", "validation", "dev", "TRAINING", "val"]
    rows = [{"prompt": f"p{i}", "answer": "1", "part": n} for i, n in enumerate(names)]
    recs = load(write_jsonl(tmp_path / "s.jsonl", rows), split_column="part")
    assert [r["split"] for r in recs] == ["train", "test", "test", "test", "train", "test"]
    rows.append({"prompt": "p9", "answer": "1", "part": "holdout"})
    msg = error(write_jsonl(tmp_path / "s.jsonl", rows), split_column="part")
    assert "'holdout'" in msg and "neither train" in msg


# --- errors ----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert error(tmp_path / "nope.jsonl").startswith("problem source not found:")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,answer\n1+1,2\n")
    assert "unknown format" in error(tmp_path / "p.csv")
    (tmp_path / "empty_dir").mkdir()
    assert "neither a datasets save_to_disk" in error(tmp_path / "empty_dir")
    assert "needs a file" in error(tmp_path / "empty_dir", format="jsonl")
    assert "needs a save_to_disk directory" in error(tmp_path / "p.csv", format="hf_disk")
    with pytest.raises(ValidationError, match="format"):
        ProblemSourceConfig(path="p.csv", format="csv")


def test_config_rejects_unknown_keys_and_bad_ranges() -> None:
    with pytest.raises(ValidationError, match="prompt_colum"):
        ProblemSourceConfig(path="p.jsonl", prompt_colum="q")
    with pytest.raises(ValidationError):
        ProblemSourceConfig(path="p.jsonl", test_fraction=1.5)
    with pytest.raises(ValidationError):
        ProblemSourceConfig(path="p.jsonl", limit=0)


def test_missing_column_suggests_closest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    msg = error(path, prompt_column="questions", answer_column="solution")
    assert "column 'questions' (prompt_column) not found" in msg
    assert "available: question, solution, uid" in msg
    assert "did you mean 'question'?" in msg
    msg = error(path, prompt_column="question", answer_column="zzz")
    assert "'zzz' (answer_column)" in msg and "did you mean" not in msg
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), tmp_path / "p.parquet")
    assert "did you mean 'question'?" in error(tmp_path / "p.parquet", prompt_column="Question")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert "no rows" in error(tmp_path / "e.jsonl")
    empty = pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "e.parquet")
    assert "no rows" in error(tmp_path / "e.parquet")


def test_null_or_empty_values_counted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "ok", "answer": "1"},
        {"prompt": "  ", "answer": "1"},
        {"answer": "1"},
        {"prompt": None, "answer": "1"},
    ]
    msg = error(write_jsonl(tmp_path / "p.jsonl", rows))
    assert (
        "3 of 4 row(s) have a missing, null or empty 'prompt' (prompt_column); first at line 2"
        in msg
    )
    table = pa.table({"prompt": ["a", "b", "c"], "answer": [1.0, float("nan"), None]})
    pq.write_table(table, tmp_path / "p.parquet")
    msg = error(tmp_path / "p.parquet")
    assert (
        "2 of 3 row(s) have a missing, null or empty 'answer' (answer_column); first at row 1"
        in msg
    )


def test_non_scalar_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "answer": [1, 2]}])
    assert "holds list values at line 1" in error(path)


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "answer": "1", "id": i % 3} for i in range(7)]
    msg = error(write_jsonl(tmp_path / "p.jsonl", rows), id_column="id")
    assert "duplicate id '0' in 'id' (id_column) at line 1 and line 4; 4 repeated row(s)" in msg


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    assert error(path).startswith(f"{path}:3: malformed JSON")
    path.write_text('{"prompt": "a", "answer": "1"}\n["b", "2"]\n')
    assert "p.jsonl:2: expected one JSON object per line, got list" in error(path)


def test_split_option_only_for_hf(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}])
    assert "use split_column" in error(path, split="train")


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "cannot read Parquet" in error(tmp_path / "bad.parquet")


# -- GSM8K, MATH and datasets.load_dataset (GSM8K's own files: the committed fixture) --------

GSM8K = GSM8K_FIXTURE  # GSM8K's first 150 train and 50 test problems, as it ships them


def test_gsm8k_gold_answers_come_after_the_last_hashes() -> None:
    from data.sources import gsm8k_gold

    assert gsm8k_gold("3 + 4 = <<3+4=7>>7\n#### 7") == "7"
    assert gsm8k_gold("x #### 2\nmore\n#### 1,234") == "1234"
    assert gsm8k_gold("no marker") is None and gsm8k_gold("#### ") is None


def test_boxed_gold_answers_balance_their_braces() -> None:
    from data.sources import boxed_gold

    assert boxed_gold(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert boxed_gold(r"\boxed{1} then \boxed{x^{2}}") == "x^{2}"
    assert boxed_gold(r"\fbox{5}") == "5"
    assert boxed_gold(r"\boxed{unclosed") is None and boxed_gold("none") is None


def test_the_gsm8k_test_file_reads_with_its_gold_answers() -> None:
    recs = load(GSM8K / "test.jsonl", prompt_column="question", answer_format="gsm8k", limit=20)
    assert len(recs) == 20
    assert recs[0]["answer"] == "18" and recs[0]["prompt"].startswith("Janet")
    assert all(r["answer"] and "####" not in r["answer"] and "," not in r["answer"] for r in recs)


def test_a_gsm8k_row_without_a_gold_answer_is_named(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "w\n#### 3"}, {"question": "q2", "answer": "no marker"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ProblemSourceError, match=r"g.jsonl: 1 of 2 row\(s\) .* line 2"):
        load(tmp_path / "g.jsonl", prompt_column="question", answer_format="gsm8k")


def test_math_solutions_read_their_boxed_answer(tmp_path: Path) -> None:
    rows = [
        {"problem": "Half of 1?", "solution": r"It is $\boxed{\frac{1}{2}}$."},
        {"problem": "1+1?", "solution": r"$\boxed{2}$"},
    ]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load(
        tmp_path / "math.jsonl",
        prompt_column="problem",
        answer_column="solution",
        answer_format="boxed",
    )
    assert [r["answer"] for r in recs] == [r"\frac{1}{2}", "2"]


def test_load_dataset_reads_the_gsm8k_directory_with_its_splits() -> None:
    """The real datasets.load_dataset on a local directory: train.jsonl and test.jsonl become
    splits train and test (a hub id takes the same path, unreachable offline); LICENSE and
    NOTICE beside them are no split."""
    recs = load(GSM8K, format="hf_dataset", prompt_column="question", answer_format="gsm8k")
    splits = Counter(r["split"] for r in recs)
    assert splits == {"train": 150, "test": 50}
    one = load(
        GSM8K, format="hf_dataset", prompt_column="question", answer_format="gsm8k", split="test"
    )
    assert len(one) == 50
    assert [r["prompt"] for r in one] == [r["prompt"] for r in recs if r["split"] == "test"]


@needs_full_gsm8k
def test_the_full_gsm8k_reads_with_every_gold_answer_and_holds_the_fixture() -> None:
    """The full set, from the directory MPD_GSM8K names: GSM8K's own split sizes, every row
    with a gold answer, and the committed fixture is its first rows, unchanged."""
    assert FULL_GSM8K is not None
    recs = load(FULL_GSM8K, format="hf_dataset", prompt_column="question", answer_format="gsm8k")
    assert Counter(r["split"] for r in recs) == {"train": 7473, "test": 1319}
    assert all(r["answer"] and "####" not in r["answer"] for r in recs)
    for split in ("train", "test"):
        fixture = (GSM8K / f"{split}.jsonl").read_text().splitlines()
        full = (FULL_GSM8K / f"{split}.jsonl").read_text().splitlines()
        assert fixture == full[: len(fixture)], split


# A child process reads hub datasets as the problems stage does (load_problems), with the hub
# settings of its environment (huggingface_hub and datasets read them once, at import). The
# hub client's own backoff (1 + 2 + 4 + 8 + 8 s between its tries) is cut: the failures are
# real, only the waits are skipped.
HUB_CHILD = """
import sys, time
time.sleep = lambda seconds: None
from data.errors import kind_of
from data.sources import ProblemSourceConfig, load_problems

for name in sys.argv[1:]:
    cfg = ProblemSourceConfig(path=name, format="hf_dataset", prompt_column="question")
    try:
        load_problems(cfg, 0)
    except Exception as exc:
        print(name, kind_of(exc), type(exc).__name__, exc, sep="\\t")
"""


class _StandInHub(BaseHTTPRequestHandler):
    """A stand-in for the hub (none is reachable here): 503 for ``mpd-test/down``, 404 for
    ``mpd-test/missing``, and the connection dropped without an answer for anything else."""

    def _answer(self) -> None:
        codes = {"/mpd-test/down/": 503, "/mpd-test/missing/": 404}
        code = next((c for part, c in codes.items() if part in self.path), None)
        if code is None:
            self.close_connection = True
            return
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


def _read_hub(names: list[str], tmp_path: Path, endpoint: str | None) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    env.update({"HF_ENDPOINT": endpoint} if endpoint else {"HF_HUB_OFFLINE": "1"})
    out = subprocess.run(
        [sys.executable, "-c", HUB_CHILD, *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    return {row[0]: row[1:] for row in rows}


def test_a_hub_dataset_offline_is_the_users_to_fix(tmp_path: Path) -> None:
    """The hub switched off (the user's own HF_HUB_OFFLINE) and the dataset not cached: one
    line saying so and what to set, exit 2; not a network failure to retry."""
    got = _read_hub(["openai/gsm8k"], tmp_path, endpoint=None)
    kind, name, message = got["openai/gsm8k"]
    assert (kind, name) == ("user", "ProblemSourceError"), message
    assert "hub is switched off here (HF_HUB_OFFLINE)" in message
    assert "set problems.path to a local copy" in message


def test_a_hub_that_does_not_answer_is_transient(tmp_path: Path) -> None:
    """A hub that answers 503, drops the connection, or is not listening at all: transient
    (retried by the stage task, then exit 1), naming the dataset; a 404 is the user's."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        got = _read_hub(["mpd-test/down", "mpd-test/gone", "mpd-test/missing"], tmp_path, endpoint)
    finally:
        server.shutdown()
        server.server_close()
    got |= _read_hub(["mpd-test/refused"], tmp_path, f"http://127.0.0.1:{free_port()}")
    for name, said in [
        ("mpd-test/down", "503"),
        ("mpd-test/gone", "RemoteProtocolError"),
        ("mpd-test/refused", "ConnectionError"),
    ]:
        kind, cls, message = got[name]
        assert (kind, cls) == ("transient", "HubUnreachableError"), message
        assert (
            message.startswith(f"{name}: the Hugging Face hub did not answer") and said in message
        )
    kind, cls, message = got["mpd-test/missing"]
    assert (kind, cls) == ("user", "ProblemSourceError") and "mpd-test/missing" in message


# -- the one check, before Prefect starts and in the stage (issue 26) --------------------------


def test_check_and_load_agree_and_accept_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    """A BOM, CRLF line endings and a trailing blank line are a valid file; the preflight's
    count is the stage's rows."""
    path = tmp_path / "p.jsonl"
    body = '{"prompt": "a", "answer": 1}\r\n{"prompt": "b", "answer": "2"}\r\n\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    cfg = ProblemSourceConfig(path=str(path))
    assert check_problem_source(cfg) == 2
    assert [(r["prompt"], r["answer"]) for r in load_problems(cfg, 0)] == [("a", "1"), ("b", "2")]


def test_an_integer_answer_past_64_bits_keeps_every_digit(tmp_path: Path) -> None:
    """orjson reads it as a float; the row is read again with every digit."""
    big = 2**70 + 1
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "p", "answer": big}, {"prompt": "q", "answer": 3}]
    )
    assert [r["answer"] for r in load(path)] == [str(big), "3"]


def test_bytes_that_are_not_utf8_are_named_by_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    msg = error(path)
    assert msg == (
        f"{path}:2: not UTF-8 text (byte 0xe9 at byte offset 46 of the file): save it as UTF-8"
    )


def test_duplicate_ids_name_both_rows_in_parquet(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"p{i}", "answer": "1", "id": "x" if i in (2, 5) else str(i)} for i in range(7)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    msg = error(tmp_path / "p.parquet", id_column="id")
    assert "duplicate id 'x' in 'id' (id_column) at row 2 and row 5; 1 repeated row(s)" in msg


def test_the_check_writes_nothing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    check_problem_source(ProblemSourceConfig(path=str(path), **MAPPED))
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]


# Files the Arrow reader takes (one object per line, exact types) and files it hands to the line
# reader (blank lines inside, two objects on a line, mixed or inexact types, bad bytes, bad JSON).
READER_CASES = {
    "plain": b'{"q": "a", "answer": "1", "id": "x"}\n{"q": "b", "answer": "2", "id": "y"}\n',
    "bom crlf trailing blanks": b'\xef\xbb\xbf{"q": "a", "answer": 1}\r\n{"q": "b", "answer": 2}\r\n\n \n',
    "key order and a missing key": b'{"answer": "1", "q": "a"}\n{"id": "z", "q": "b", "answer": "2"}\n',
    "nulls and booleans": b'{"q": null, "answer": true}\n{"q": "b", "answer": false}\n',
    "no final newline": b'{"q": "a", "answer": "1"}',
    "nested unwanted column": b'{"q": "a", "answer": "1", "m": {"k": [1, 2]}}\n',
    "blank line inside": b'{"q": "a", "answer": "1"}\n\n{"q": "b", "answer": "2"}\n',
    "leading blank line": b'\n{"q": "a", "answer": "1"}\n',
    "two objects on a line": b'{"q": "a", "answer": "1"} {"q": "b", "answer": "2"}\n',
    "text and numbers": b'{"q": "a", "answer": 1}\n{"q": "b", "answer": "2"}\n',
    "a float": b'{"q": "a", "answer": 1}\n{"q": "b", "answer": 2.5}\n',
    "an integer past 64 bits": b'{"q": "a", "answer": 123456789012345678901234567890}\n',
    "latin-1": b'{"q": "caf\xe9", "answer": "1"}\n',
    "malformed": b'{"q": "a", "answer": "1"}\n{"q": "b", "answer": }\n',
    "a list line": b'{"q": "a", "answer": "1"}\n[1, 2]\n',
    "only blank": b"\n \n",
}


@pytest.mark.parametrize("data", list(READER_CASES.values()), ids=list(READER_CASES))
def test_jsonl_readers_agree(tmp_path: Path, data: bytes) -> None:
    """The fast reader (Arrow, whole file) gives what the line reader gives, or steps aside:
    the same table, or the same one-line error."""
    from data.problem_readers import ProblemSourceError, _read_lines, read_jsonl

    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    results = []
    for read in (lambda: read_jsonl(path, ["q", "answer", "id"], None),
                 lambda: _read_lines(path, ["q", "answer", "id"], None)):  # fmt: skip
        try:
            t = read()
            results.append((sorted(t.columns), t.data, t.n_rows, t.lines))
        except ProblemSourceError as exc:
            results.append(str(exc))
    assert results[0] == results[1]

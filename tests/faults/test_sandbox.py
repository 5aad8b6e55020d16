"""User SQL from the attacker's side: every escape attempt through ``mpd sql`` and ``filter.sql``
is refused in one line, and nothing is read or written outside the workspace.

The attacker is anyone who can set a query or a deployment's ``overrides`` (``filter.sql`` is a
path they choose). Each attempt in :data:`ATTACKS` goes through three doors:

- ``mpd sql -w WS QUERY`` (the CLI's own ``main``, in this process: ~0.1 s a row);
- ``mpd run -w WS --set filter.sql=FILE``: refused by the preflight, before Prefect starts (a
  tripwire fails the test if an attempt gets past it);
- the filter stage itself (``run_stage`` + ``filter_body``, as the flow runs it) over the round's
  real committed Parquet files, where a COPY onto a committed file would have a target.

Each row names the refusal it must get (the guard's "refused: ..." or the sandbox's "Permission
Error"), so an attempt that ran and only failed later for another reason (wrong columns) does
not pass. Around every attempt: a secret file outside the workspace and a secret in this
process's environment never appear in any output; no file appears, changes or goes anywhere
under the test's root (the workspace's committed files included); a real HTTP server on
127.0.0.1 gets no request. ``test_sandbox_attacks_are_real`` runs the reads and writes on a plain
DuckDB connection to show they are not straw men. Select them all with ``pytest -k sandbox``.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.prefect_env
from data.errors import UserError
from data.store import StageStore
from flows.cli import main
from tasks.filter import FilterConfig
from tests.conftest import REPO, free_port
from tests.faults.test_filter_faults import commit_round, run_filter_stage

SECRET = "mpd-sandbox-secret-7f3a9c"


def q(path: Path | str) -> str:
    """A path as the attacker writes it in SQL: a string literal, quotes doubled."""
    return "'" + str(path).replace("'", "''") + "'"


@dataclass
class World:
    root: Path  # everything the test owns; nothing under it may change
    ws: Path  # the workspace; its path holds a quote
    outside: Path  # secrets beside the workspace
    committed: Path  # one committed rewrites file (a COPY target inside the workspace)
    port: int  # the HTTP server that must get no request
    hits: list[str]

    def fill(self, template: str) -> str:
        return template.format(
            ws=q(self.ws),
            ws_raw=str(self.ws).replace("'", "''"),
            committed=q(self.committed),
            staged=q(self.ws / ".staging" / "stray.parquet"),
            secret_txt=q(self.outside / "secret.txt"),
            secret_csv=q(self.outside / "secret.csv"),
            secret_json=q(self.outside / "secret.json"),
            secret_parquet=q(self.outside / "secret.parquet"),
            outside=str(self.outside).replace("'", "''"),
            traversal=q(f"{self.ws}/rewrite/round=1/../../../outside/secret.txt"),
            link=q(self.ws / "link.parquet"),
            url=q(f"http://127.0.0.1:{self.port}/secret.csv"),
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = f"a,b\n{SECRET},1\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sandbox")
    ws, outside = root / "it's a workspace", root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.csv").write_text(f"a,b\n{SECRET},1\n")
    (outside / "secret.json").write_text(f'{{"a": "{SECRET}"}}\n')
    pq.write_table(pa.table({"a": [SECRET]}), outside / "secret.parquet")
    committed = commit_round(ws)
    (ws / ".staging").mkdir(exist_ok=True)
    pq.write_table(pa.table({"a": [SECRET]}), ws / ".staging" / "stray.parquet")
    (ws / "link.parquet").symlink_to(outside / "secret.parquet")
    port = free_port()
    _Handler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["MPD_SANDBOX_TEST_SECRET"] = SECRET  # what /proc/self/environ would show
    try:
        yield World(root, ws, outside, committed, port, _Handler.hits)
    finally:
        os.environ.pop("MPD_SANDBOX_TEST_SECRET", None)
        server.shutdown()


# (id, SQL template, the refusal the message must show). "refused" is the guard (the text never
# runs); "Permission Error" is DuckDB's sandbox; "Catalog Error" is a replacement scan the
# sandbox turned off (the string is no longer a file name).
ATTACKS: list[tuple[str, str, str]] = [
    ("read_text a secret", "SELECT * FROM read_text({secret_txt})", "Permission Error"),
    ("read_text environ", "SELECT content FROM read_text('/proc/self/environ')", "Permission Error"),
    ("read_blob", "SELECT * FROM read_blob({secret_txt})", "Permission Error"),
    ("read_csv", "SELECT * FROM read_csv({secret_csv})", "Permission Error"),
    ("read_csv_auto passwd", "SELECT * FROM read_csv_auto('/etc/passwd')", "Permission Error"),
    ("read_json", "SELECT * FROM read_json({secret_json})", "Permission Error"),
    ("read_ndjson", "SELECT * FROM read_ndjson_auto({secret_json})", "Permission Error"),
    ("read_parquet outside", "SELECT * FROM read_parquet({secret_parquet})", "Permission Error"),
    ("parquet_metadata", "SELECT * FROM parquet_metadata({secret_parquet})", "Permission Error"),
    ("parquet_schema", "SELECT * FROM parquet_schema({secret_parquet})", "Permission Error"),
    ("sniff_csv", "SELECT * FROM sniff_csv({secret_csv})", "Permission Error"),
    ("glob home", "SELECT * FROM glob('/root/*')", "Permission Error"),
    ("glob the workspace", "SELECT * FROM glob('{ws_raw}/**')", "Permission Error"),
    ("glob workspace parquet", "SELECT count(*) FROM read_parquet('{ws_raw}/*/*/*.parquet')",
     "Permission Error"),
    ("staging not committed", "SELECT * FROM read_parquet({staged})", "Permission Error"),
    ("symlink to outside", "SELECT * FROM read_parquet({link})", "Permission Error"),
    ("dot-dot traversal", "SELECT * FROM read_text({traversal})", "Permission Error"),
    ("file:// url", "SELECT * FROM read_text('file:///etc/hostname')", "Permission Error"),
    ("http url", "SELECT * FROM read_csv({url})", "Permission Error"),
    ("replacement scan csv", "SELECT * FROM {secret_csv}", "Permission Error"),
    ("replacement scan parquet", "FROM {secret_parquet}", "Permission Error"),
    ("replacement scan http", "FROM {url}", "Permission Error"),
    ("query_table a file", "FROM query_table({secret_csv})", "Permission Error"),
    ("path built at run time", "SELECT * FROM read_text(concat('/etc/', 'hostname'))",
     "Permission Error"),
    ("extensions directory", "SELECT * FROM duckdb_extensions()", "Permission Error"),
    ("secrets store", "SELECT * FROM duckdb_secrets()", "Permission Error"),
    ("which_secret", "SELECT * FROM which_secret('s3://bucket/x', 's3')", "Permission Error"),
    ("copy out", "COPY (SELECT 1) TO '{outside}/pwned.csv'", "refused: COPY"),
    ("copy over a committed file",
     "COPY (SELECT 1 AS a) TO {committed} (FORMAT csv, USE_TMP_FILE false)", "refused: COPY"),
    ("copy inside WITH",
     "WITH x AS (COPY (SELECT 1) TO '{outside}/pwned.csv') SELECT * FROM rewrites",
     "COPY inside WITH"),
    ("copy inside WITH onto committed",
     "WITH x AS (COPY (SELECT 1 AS a) TO {committed} (FORMAT csv, USE_TMP_FILE false)) "
     "SELECT 1", "COPY inside WITH"),
    ("attach a file", "ATTACH '{outside}/pwned.db' AS x", "refused: ATTACH"),
    ("export database", "EXPORT DATABASE '{outside}/exported'", "refused: EXPORT"),
    ("install", "INSTALL httpfs", "refused: INSTALL"),
    ("load a file", "LOAD '{outside}/evil.duckdb_extension'", "refused: LOAD"),
    ("set external access", "SET enable_external_access = true", "refused: SET"),
    ("set allowed directories", "SET allowed_directories = ['/']", "refused: SET"),
    ("reset the lock", "RESET lock_configuration", "refused: RESET"),
    ("pragma", "PRAGMA enable_external_access", "refused: PRAGMA"),
    ("create secret", "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "refused: CREATE"),
    ("call", "CALL enable_logging()", "refused: CALL"),
    ("closing parenthesis",
     "SELECT 1) TO '{outside}/pwned.csv'; ATTACH '{outside}/pwned.db' AS x; SELECT (1",
     "syntax error"),
    ("second statement", "SELECT * FROM rewrites; COPY rewrites TO '{outside}/pwned.csv'",
     "refused: 2 statements"),
    ("comment hides a statement",
     "SELECT 1 /* ; */ ; ATTACH '{outside}/pwned.db' AS x -- ;", "refused: 2 statements"),
    ("explain analyze copy", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/pwned.csv'",
     "refused: COPY"),
    ("query() runs text", "FROM query('SELECT * FROM read_text(''/etc/hostname'')')",
     "refused: function query()"),
    ("quote in a path", "SELECT * FROM read_text('{outside}/it''s.txt')", "Permission Error"),
]  # fmt: skip


def _state(world: World) -> dict[str, str]:
    """Every file under the test's root with a digest of its content (links by target)."""
    out = {}
    for path in sorted(world.root.rglob("*")):
        rel = str(path.relative_to(world.root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def watch(world: World) -> Iterator[World]:
    """The world, checked after the test: nothing changed under it, no HTTP request made."""
    before, hits = _state(world), len(world.hits)
    yield world
    assert _state(world) == before, "a file was written, changed or removed"
    assert world.hits[hits:] == [], "a request reached the HTTP server"


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text and SECRET not in text, text
    return lines[0]


IDS = [a[0] for a in ATTACKS]


@pytest.mark.parametrize(("template", "why"), [a[1:] for a in ATTACKS], ids=IDS)
def test_sandbox_mpd_sql_refuses(
    watch: World, capsys: pytest.CaptureFixture[str], template: str, why: str
) -> None:
    code = main(["sql", "-w", str(watch.ws), watch.fill(template)])
    out, err = capsys.readouterr()
    assert code == 2 and SECRET not in out, (code, out, err)
    line = _one_line(err)
    assert line.startswith("mpd: error: ") and why in line, line


@pytest.mark.parametrize(("template", "why"), [a[1:] for a in ATTACKS], ids=IDS)
def test_sandbox_filter_file_refused_before_the_run(
    watch: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    template: str,
    why: str,
) -> None:
    """``--set filter.sql=FILE``, as a deployment's overrides would: refused by the preflight."""

    def tripwire(*_: object) -> int:
        pytest.fail("the filter got past the preflight: a campaign would start")

    monkeypatch.setattr(flows.prefect_env, "run_flow", tripwire)
    sql = tmp_path / "filter.sql"
    sql.write_text(watch.fill(template))
    code = main(["run", "-w", str(watch.ws), "--set", f"filter.sql={sql}"])
    out, err = capsys.readouterr()
    assert code == 2 and SECRET not in out, (code, out, err)
    line = _one_line(err)
    assert line.startswith("mpd: error: ") and why in line, line


@pytest.mark.parametrize(("template", "why"), [a[1:] for a in ATTACKS], ids=IDS)
def test_sandbox_filter_stage_refuses(
    watch: World, tmp_path: Path, template: str, why: str
) -> None:
    """The stage itself, over the round's committed files: refused, nothing committed."""
    store = StageStore(watch.ws)
    sql = tmp_path / "filter.sql"
    sql.write_text(watch.fill(template))
    cfg = FilterConfig(sql=sql)
    with pytest.raises(UserError) as err:
        run_filter_stage(store, cfg)
    message = str(err.value)
    assert why in message and "\n" not in message and SECRET not in message, message
    assert store.manifest("filter", 1) is None
    _drop_staging(watch.ws)


def _drop_staging(ws: Path) -> None:
    """The failed stage's staging (resumable work; never visible to SQL), so that the next row
    starts from the same workspace."""
    shutil.rmtree(ws / ".staging" / "filter", ignore_errors=True)


def test_sandbox_attacks_are_real(world: World, tmp_path: Path) -> None:
    """Without the sandbox, the same texts read the secret and write outside: on a plain DuckDB
    connection (the filter stage's before this change) they succeed."""
    con = duckdb.connect()
    try:
        read = {
            "read_text a secret": "SELECT content FROM read_text({secret_txt})",
            "read_csv": "SELECT a FROM read_csv({secret_csv})",
            "replacement scan parquet": "SELECT a FROM {secret_parquet}",
            "symlink to outside": "SELECT a FROM read_parquet({link})",
            "dot-dot traversal": "SELECT content FROM read_text({traversal})",
        }
        for name, template in read.items():
            rows = con.sql(world.fill(template)).fetchall()
            assert rows == [(SECRET,)], name
        environ = con.sql("SELECT content FROM read_text('/proc/self/environ')").fetchall()
        assert "PATH=" in environ[0][0]  # where an object store's secret key would be
        target = tmp_path / "pwned.csv"
        con.sql(f"WITH x AS (COPY (SELECT 1) TO {q(target)}) SELECT 1").fetchall()
        assert target.exists()
    finally:
        con.close()


def test_sandbox_workspace_with_a_quote_runs_the_filter(world: World, tmp_path: Path) -> None:
    """Found: a workspace path holding ``'`` broke the filter (the output path was pasted into a
    COPY statement). Paths are bound now: the built-in filter runs over such a workspace."""
    store = StageStore(world.ws)
    result = run_filter_stage(store, FilterConfig(ratio=10), "e" * 64)
    try:
        assert "'" in str(world.ws) and result.rows == 12
    finally:
        store.invalidate("filter", 1)
        _drop_staging(world.ws)


def test_sandbox_through_the_real_command(world: World, tmp_path: Path) -> None:
    """The same refusals through the ``mpd`` command, as a nightly deployment runs it: a filter
    file that closes COPY's parenthesis (found: it wrote a CSV file and a database outside the
    workspace, exit 0) and a query reading the process's environment (found: it returned the
    object store's secret key)."""
    evil = tmp_path / "evil.sql"
    evil.write_text(world.fill(ATTACKS[IDS.index("closing parenthesis")][1]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = _state(world)
    for argv in (
        ["run", "-w", str(world.ws), "--set", f"filter.sql={evil}"],
        ["sql", "-w", str(world.ws), "SELECT content FROM read_text('/proc/self/environ')"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        line = _one_line(out.stderr)
        assert "prefect" not in out.stderr.lower() and SECRET not in out.stdout, line
    assert _state(world) == before
    assert not (world.outside / "pwned.csv").exists() and not (world.outside / "pwned.db").exists()

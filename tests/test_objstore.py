"""Workspaces on object storage, against a real S3-compatible server on 127.0.0.1.

The server is moto's server mode, started by the project's own ``scripts/s3-server.sh`` (a
server that cannot start fails the module; it does not skip). Each "machine" is an
``mpd`` subprocess with its own ``MPD_CACHE_DIR``: a fresh cache directory is a machine that has
never seen the workspace, so whatever it finds came from the object store.

What is held here: a whole one-round campaign committed to ``s3://…``; ``mpd status`` and
``mpd sql`` reading the bucket in place; another machine finding every stage cached (downloaded,
sha256-checked); kill -9 mid-sampling, then a resume on another machine reusing the shards the
killed run uploaded, with rows equal to the clean run; an object overwritten in place caught by
``status --verify`` (ETag) and recomputed by the next run; a second writer refused by the
lease; and the commit protocol's parts (manifest last, a stale or expired lease taken over
exactly once).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3fs import S3FileSystem

from data.lock import ObjectLease, WorkspaceBusyError, WorkspaceLock
from data.manifest import MANIFEST, FileEntry, Manifest
from data.objstore import REMOTE_FILE, ObjectStore, attach, default_cache
from tests.conftest import free_port
from tests.fencing import (
    LEASE_S,
    check_same_host_name_never_taken_over,
    fenced_out,
    pause_outside_lease_steps,
    resume_and_wait,
    stop_group,
)

# The campaign tests' tiny budgets and helpers: the same one-round campaign, on a bucket.
from tests.test_campaign import (
    ENV,
    REPO,
    ROUND_STAGES,
    SAMPLE_SHARDS,
    command,
    ok,
    sets,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

BUCKET = "mpd-tests"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The S3 server (scripts/s3-server.sh) with the test bucket; yields its environment."""
    services = tmp_path_factory.mktemp("services")
    env = {
        **os.environ,
        "MPD_SERVICES_DIR": str(services),
        "S3_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    script = str(REPO / "scripts" / "s3-server.sh")
    out = subprocess.run(
        ["bash", script, "start", BUCKET], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"the S3 server did not start: {out.stderr}"
    exports = dict(
        item.split("=", 1) for item in out.stdout.strip().removeprefix("export ").split()
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in exports.items():  # for this process's own ObjectStore calls
                patch.setenv(key, value)
            # fsspec caches filesystems by their arguments, not by the environment they read:
            # without this, a module's store would talk to an earlier module's (stopped) server.
            S3FileSystem.clear_instance_cache()
            yield exports
            S3FileSystem.clear_instance_cache()
    finally:
        subprocess.run(["bash", script, "stop"], env=env, timeout=60)
        status = subprocess.run(["bash", script, "status"], env=env, capture_output=True)
        assert status.returncode == 3, "the S3 server is still running after stop"


def machine(tmp_path: Path, name: str) -> dict[str, str]:
    """The environment of one machine: its own cache directory for local working copies."""
    return {"MPD_CACHE_DIR": str(tmp_path / f"machine-{name}")}


def environ(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **ENV, **env}


def mpd(env: dict[str, str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), capture_output=True, text=True, cwd=REPO, env=environ(env), timeout=600
    )


def run(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return mpd(env, "run", "-w", url, "--rounds", 1, *sets())


def store(url: str) -> ObjectStore:
    return ObjectStore(url)


def status(url: str, env: dict[str, str], *flags: str) -> dict[str, tuple[str, str]]:
    """``mpd status`` of a URL workspace parsed: "round/stage" -> (state, detail)."""
    out = ok(mpd(env, "status", "-w", url, "--set", "rounds=1", *flags))
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 9 and cells[1].isdigit():
            rows[f"{cells[1]}/{cells[2]}"] = (cells[3], cells[7])
    return rows


def sql(url: str, env: dict[str, str], query: str) -> list[dict]:
    return json.loads(ok(mpd(env, "sql", "-w", url, "--format", "json", query)).stdout)


def sample_rows(url: str, env: dict[str, str]) -> list[tuple]:
    rows = sql(url, env, "select problem_id, sample_idx, token_ids from samples order by all")
    return [(r["problem_id"], r["sample_idx"], r["token_ids"]) for r in rows]


def local_copy(url: str, env: dict[str, str]) -> Path:
    """A machine's local working copy of ``url``."""
    return Path(env["MPD_CACHE_DIR"]) / "workspaces" / default_cache(url).name


def outcomes(url: str, env: dict[str, str]) -> dict[str, str]:
    """What that machine's last run did per "round/stage": done (computed), cached, failed."""
    return outcomes_at(local_copy(url, env))


def outcomes_at(workspace: Path) -> dict[str, str]:
    stages = json.loads((workspace / ".mpd" / "last_run.json").read_text())["stages"]
    return {where: o["state"] for where, o in stages.items()}


def copy_workspace(src: str, dst: str) -> None:
    s = store(src)
    s.fs.copy(s.root, store(dst).root, recursive=True)


@pytest.fixture(scope="module")
def clean_run(
    s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, str]]:
    """A one-round campaign committed to object storage by machine A: its URL and A."""
    url = f"s3://{BUCKET}/clean"
    env = machine(tmp_path_factory.mktemp("a"), "a")
    ok(run(url, env))
    assert {outcomes(url, env)[f"1/{s}"] for s in ROUND_STAGES} == {"done"}
    return url, env


@pytest.fixture(scope="module")
def clean(clean_run: tuple[str, dict[str, str]]) -> str:
    return clean_run[0]


def held(s: ObjectStore) -> bool:
    """Whether the store's lease names a holder (a released lease keeps its record, with its
    fencing token and no holder, for the next lease to count on from)."""
    try:
        return bool(json.loads(s.fs.cat_file(s.path(".lock"))).get("pid"))
    except FileNotFoundError:
        return False


def test_campaign_commits_every_stage_to_object_storage(clean: str) -> None:
    s = store(clean)
    committed = {(m.round, m.stage): m for m in s.committed()}
    for stage in ROUND_STAGES:
        man = committed[(1, stage)]
        assert man.objects.startswith(man.key[:16]), man.objects
        assert all(f.etag for f in man.files), "every object's ETag is recorded at publication"
        assert not s.validate(stage, 1, deep=True)
    assert (0, "eval") in committed and (0, "problems") in committed
    assert not s.fs.exists(s.path(".staging", "sample")), "staging is deleted after the commit"
    assert not held(s), "the lease is released at the end"


def test_status_and_sql_read_the_bucket_without_a_local_copy(clean: str, tmp_path: Path) -> None:
    env = machine(tmp_path, "analyst")
    rows = status(clean, env, "--verify")
    assert {w: st for w, (st, _) in rows.items()} == {
        "0/problems": "done",
        "0/bootstrap": "done",
        "0/eval": "done",
        **{f"1/{s}": "done" for s in ROUND_STAGES},
    }
    runs = sql(clean, env, "select stage, round, rows from stage_runs where round = 1")
    assert {r["stage"] for r in runs} == set(ROUND_STAGES)
    kept = sql(clean, env, "select count(*) as n from kept")[0]["n"]
    assert kept == sql(clean, env, "select kept from round_summary where round = 1")[0]["kept"]
    assert len(sample_rows(clean, env)) == SAMPLE_SHARDS
    assert not Path(env["MPD_CACHE_DIR"]).exists(), "reading made no local copy"


SANDBOX_ATTEMPTS = [
    ("SELECT content FROM read_text('s3://{bucket}/secret.txt')", "Permission Error"),
    ("SELECT * FROM glob('s3://{bucket}/*')", "Permission Error"),
    ("SELECT * FROM read_parquet('s3://{bucket}/clean/**/*.parquet')", "Permission Error"),
    ("SELECT * FROM read_text('s3://{bucket}/clean/.lock')", "Permission Error"),
    ("SELECT content FROM read_text('/etc/hostname')", "Permission Error"),
    ("FROM 's3://{bucket}/secret.txt'", "does not exist"),  # not a file name any more
    ("COPY (SELECT 1) TO 's3://{bucket}/pwned.csv'", "refused: COPY"),
    ("WITH x AS (COPY (SELECT 1) TO 's3://{bucket}/pwned.csv') SELECT 1", "COPY inside WITH"),
]


@pytest.mark.parametrize(("query", "why"), SANDBOX_ATTEMPTS)
def test_sql_on_object_storage_is_sandboxed(
    clean: str, tmp_path: Path, query: str, why: str
) -> None:
    """``mpd sql`` on a bucket registers the bucket's filesystem with DuckDB: the sandbox still
    lets it read the committed objects only (not another object of the bucket, not the lease, not
    a local file), and nothing is written to the bucket."""
    s = store(clean)
    secret = "bucket-secret-5e1d"
    s.fs.pipe(f"{BUCKET}/secret.txt", secret.encode())
    before = sorted(s.fs.find(BUCKET))
    out = mpd(machine(tmp_path, "analyst"), "sql", "-w", clean, query.format(bucket=BUCKET))
    assert out.returncode == 2 and secret not in out.stdout + out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert why in line and "Traceback" not in out.stderr, line
    assert sorted(s.fs.find(BUCKET)) == before


def test_another_machine_finds_every_stage_cached(clean: str, tmp_path: Path) -> None:
    """Machine B has never seen the workspace: every stage is a hit, downloaded from the
    bucket (its files sha256-checked), and nothing is recomputed or republished."""
    before = {(m.round, m.stage): m.objects for m in store(clean).committed()}
    env = machine(tmp_path, "b")
    ok(run(clean, env))
    assert set(outcomes(clean, env).values()) == {"cached"}
    assert {(m.round, m.stage): m.objects for m in store(clean).committed()} == before
    copy = local_copy(clean, env)
    assert json.loads((copy / REMOTE_FILE).read_text())["url"] == clean
    assert (copy / "sample" / "round=1" / MANIFEST).is_file()


SHARD_MARKERS = (".staging", "sample", "round=1", "*", "_shards", "*.json")


def start_mid_sampling(clean: str, url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A copy of the clean campaign at ``url`` with its sample stage retracted, and ``mpd run``
    recomputing it in the background, in its own process group."""
    copy_workspace(clean, url)
    store(url).retract("sample", 1)
    with open(log, "w") as fh:
        return subprocess.Popen(
            command("run", "-w", url, "--rounds", 1, *sets()),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=environ(env),
            start_new_session=True,
        )


def wait_for_a_shard(s: ObjectStore, proc: subprocess.Popen, log: Path) -> None:
    """Until the run has uploaded its first finished shard to the staging prefix."""
    deadline = time.monotonic() + 300
    while not s.fs.glob(s.path(*SHARD_MARKERS)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no shard was ever uploaded"
        time.sleep(0.02)


def test_kill_during_sampling_resumes_on_another_machine(
    clean: str, tmp_path: Path, s3: dict[str, str]
) -> None:
    """kill -9 mid-sampling on machine A; machine B resumes with the shards A uploaded to the
    staging prefix (its own copy is empty), takes over A's dead lease, and commits the same
    rows as the clean run; the stages after sampling keep their keys and stay cached."""
    url = f"s3://{BUCKET}/killed"
    s = store(url)
    log = tmp_path / "a.log"
    proc = start_mid_sampling(clean, url, machine(tmp_path, "a"), log)
    try:
        wait_for_a_shard(s, proc, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    uploaded = len(s.fs.glob(s.path(*SHARD_MARKERS)))
    assert 1 <= uploaded < SAMPLE_SHARDS, "the kill landed mid-sampling"
    assert s.manifest("sample", 1) is None, "nothing half-done was committed"
    assert held(s), "the killed run's lease is still there"
    env_b = machine(tmp_path, "b")
    assert status(url, env_b)["1/sample"] == ("partial", f"{uploaded} shard(s)")

    out = ok(run(url, env_b))
    assert "recovered a stale lock" in out.stderr
    assert f"round 1 sample   resuming: {uploaded} finished shard(s) reused" in out.stderr
    assert out.stderr.count("round 1 sample   shard ") == SAMPLE_SHARDS - uploaded
    assert s.manifest("sample", 1).resumed_shards == uploaded
    assert {outcomes(url, env_b)[f"1/{s}"] for s in ROUND_STAGES[1:]} == {"cached"}
    assert sample_rows(url, env_b) == sample_rows(clean, env_b)


def test_signal_sigterm_releases_the_lease_and_marks_the_flow_run_crashed(
    clean: str, tmp_path: Path, prefect_api: str
) -> None:
    """SIGTERM mid-sampling on a bucket workspace, with a Prefect server of the user's
    (PREFECT_API_URL): the run ends within 10 s with exit 143 and one line, releases its lease (the
    next writer on any host need not wait for it to expire), and its flow run shows Crashed on
    that server, not Running for ever (flows/stopping.py; tests/faults/test_signals.py has the
    local cases)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    url = f"s3://{BUCKET}/stopped"
    s = store(url)
    log = tmp_path / "a.log"
    proc = start_mid_sampling(clean, url, machine(tmp_path, "a"), log)
    try:
        wait_for_a_shard(s, proc, log)
        assert held(s), "the run holds the lease"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    out = log.read_text()
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("mpd: stopped by SIGTERM; finished shards"), out
    assert not held(s), "the stopped run left its lease"
    run_id = out.split("/runs/flow-run/", 1)[1].split()[0]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.type == StateType.CRASHED


def test_an_object_changed_in_place_is_caught_and_recomputed(clean: str, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/corrupt"
    copy_workspace(clean, url)
    env = machine(tmp_path, "a")
    ok(run(url, env))  # a local copy that agrees with the bucket
    s = store(url)
    man = s.manifest("sample", 1)
    victim = s.object_path(man, "part-00003.parquet")
    data = bytearray(s.fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF  # same size: only the ETag can tell
    s.fs.pipe_file(victim, bytes(data))
    assert status(url, env)["1/sample"][0] == "done", "a size check cannot see it"
    state, detail = status(url, env, "--verify")["1/sample"]
    assert state == "corrupt" and "part-00003.parquet" in detail

    out = ok(run(url, env))
    assert "part-00003.parquet is corrupt" in out.stderr
    assert "round 1 sample   done" in out.stderr
    after = outcomes(url, env)
    assert after["1/sample"] == "done"
    assert {after[f"1/{s}"] for s in ROUND_STAGES[1:]} == {"cached"}, "same rows, same keys"
    assert status(url, env, "--verify")["1/sample"][0] == "done"
    assert sample_rows(url, env) == sample_rows(clean, env)


def test_a_second_writer_is_refused_by_the_lease(clean: str, tmp_path: Path) -> None:
    """Machine A holds the workspace (its lease is live); machine B's run is refused in one
    line naming A, before Prefect starts, and changes nothing."""
    url = f"s3://{BUCKET}/busy"
    copy_workspace(clean, url)
    local_a = tmp_path / "copy-a"
    local_a.mkdir()
    attach(local_a, url)
    before = {(m.round, m.stage): m.objects for m in store(url).committed()}
    with WorkspaceLock(local_a, command="mpd run (machine A)"):
        out = run(url, machine(tmp_path, "b"))
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("mpd: error:")]
    assert len(errors) == 1 and f"workspace {url} is in use by pid {os.getpid()}" in errors[0]
    assert "machine A" in errors[0] and "Traceback" not in out.stderr
    assert {(m.round, m.stage): m.objects for m in store(url).committed()} == before
    assert not held(store(url)), "A released its lease"


# -- the protocol's parts ------------------------------------------------------------------
def test_only_one_of_two_simultaneous_writers_gets_the_lease(s3: dict[str, str]) -> None:
    s = store(f"s3://{BUCKET}/lease-race")
    first = ObjectLease(s, {"pid": 1, "host": "elsewhere", "command": "first"}).acquire()
    try:
        with pytest.raises(WorkspaceBusyError, match="first"):
            ObjectLease(s, {"pid": 2, "host": "elsewhere", "command": "second"}).acquire()
    finally:
        first.release()
    assert not held(s)


def test_an_expired_lease_is_taken_over_once(s3: dict[str, str]) -> None:
    s = store(f"s3://{BUCKET}/lease-expired")
    s.fs.pipe_file(
        s.path(".lock"),
        json.dumps(
            {"pid": 7, "host": "gone", "command": "old", "expires": time.time() - 1}
        ).encode(),
    )
    taker = ObjectLease(s, {"pid": 8, "host": "here", "command": "new"}).acquire()
    try:
        assert taker.stale is not None and taker.stale["command"] == "old"
        with pytest.raises(WorkspaceBusyError, match="new"):  # the takeover is now live
            ObjectLease(s, {"pid": 9, "host": "here", "command": "third"}).acquire()
    finally:
        taker.release()


def test_a_live_lease_is_renewed_and_never_deleted_by_a_loser(s3: dict[str, str]) -> None:
    s = store(f"s3://{BUCKET}/lease-renew")
    lease = ObjectLease(s, {"pid": 1, "host": "elsewhere", "command": "holder"}, ttl=3.0)
    lease.acquire()
    try:
        first = json.loads(s.fs.cat_file(s.path(".lock")))["expires"]
        time.sleep(3.5)  # past the first expiry; renewals every ttl / 3 = 1 s
        renewed = json.loads(s.fs.cat_file(s.path(".lock")))["expires"]
        assert first < time.time() < renewed, "renewals kept it live past its first expiry"
        loser = ObjectLease(s, {"pid": 2, "host": "elsewhere", "command": "loser"})
        with pytest.raises(WorkspaceBusyError):
            loser.acquire()
        loser.release()  # a lease it never held: nothing to delete
        assert held(s)
    finally:
        lease.release()


def test_fencing_same_host_name_never_takes_over_a_live_object_lease(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two machines with the same host name (containers of one image): neither takes over the
    other's live lease, though the holder's pid names no process on the other (it used to:
    a matching host name and a dead pid made a live lease stale)."""
    s = store(f"s3://{BUCKET}/lease-same-name")
    check_same_host_name_never_taken_over(lambda rec, ttl: ObjectLease(s, rec, ttl), monkeypatch)


def test_fencing_the_protocol_in_its_racy_windows(s3: dict[str, str], tmp_path: Path) -> None:
    """The gaps a SIGSTOP rarely lands in, driven step by step in one process (data/objwrite.py):
    a writer whose lease was taken over cannot publish; its manifest PUT conditional on the
    manifest it read before a newer commit fails; its delete, even one that passed the lease
    check before the takeover, spares the newer writer's objects."""
    from data import fence
    from data.fence import LeaseLostError

    url = f"s3://{BUCKET}/fencing-protocol"
    s = store(url)
    local = tmp_path / "round"
    local.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), local / "part-00000.parquet")
    entry = FileEntry("part-00000.parquet", (local / "part-00000.parquet").stat().st_size, "", 2)
    man = Manifest("sample", 1, "a" * 64, [entry], 2, 0.0, 0.0, 0.0, "test")
    a = ObjectLease(s, {"pid": 1, "host": "a", "command": "writer A"}, ttl=1.0).acquire()
    b = None
    try:
        fence.hold(url, a)
        first = s.publish(man, local)
        assert first.objects.startswith(f"{'a' * 16}-g{a.token}-"), "folders carry the token"
        manifest_path = f"{s.round_path('sample', 1)}/{MANIFEST}"
        etag_a = s.etag_of(manifest_path)
        a.stop_heartbeat()  # A is paused: its lease runs out
        time.sleep(1.2)
        b = ObjectLease(s, {"pid": 2, "host": "b", "command": "writer B"}).acquire()
        assert b.token == a.token + 1
        fence.hold(url, b)
        second = s.publish(man, local)
        committed = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
        fence.hold(url, a)  # A resumes
        with pytest.raises(LeaseLostError, match=r"lost the lease .* to pid 2 on b"):
            s.publish(man, local)
        after = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
        assert after == committed, "A's uploads, named by no manifest, were taken back"
        with pytest.raises(LeaseLostError):
            s.retract("sample", 1)
        assert s.put_if(manifest_path, b"{}", etag=etag_a) is None, "a newer commit stands"
        s._drop_dirs(s.round_path("sample", 1), keep=None, upto=a.token)  # after a passed check
        assert {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()} == committed
        assert s.manifest("sample", 1).objects == second.objects
        assert not s.validate("sample", 1)
    finally:
        fence.drop(url, fence.fence_of(url))  # type: ignore[arg-type]
        a.stop_heartbeat()
        if b is not None:
            b.release()


def test_fencing_a_shard_upload_that_passed_the_check_before_a_takeover(
    s3: dict[str, str], tmp_path: Path
) -> None:
    """The window CI once caught with SIGSTOP: writer A reads its lease as current, is paused
    before its PUTs, B takes over, pulls, commits and deletes the staging; A resumes and
    uploads. A's objects land in its own token's folder (never B's), the lease read after the
    uploads finds the loss, A deletes them again and raises: the bucket is as B left it."""
    from data import fence
    from data.fence import LeaseLostError

    url = f"s3://{BUCKET}/fencing-staging"
    s = store(url)
    local = tmp_path / "round"
    (local / "_shards").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), local / "part-00000.parquet")
    marker = local / "_shards" / "part-00000.parquet.json"
    marker.write_text(json.dumps({"rows": 2}))
    entry = FileEntry("part-00000.parquet", (local / "part-00000.parquet").stat().st_size, "", 2)
    man = Manifest("sample", 1, "a" * 64, [entry], 2, 0.0, 0.0, 0.0, "test")
    a = ObjectLease(s, {"pid": 1, "host": "a", "command": "writer A"}, ttl=1.0).acquire()
    b = None
    committed: dict[str, str] = {}
    put_file = s.fs.put_file
    try:
        fence.hold(url, a)
        s.push_shard("sample", 1, "a" * 16, local / "part-00000.parquet", marker)
        assert s.partial_runs() == [("sample", 1, "a" * 16, 1, 2)], "folders carry the key"

        def takeover_then_put(*args: Any, **kwargs: Any) -> Any:
            nonlocal b, committed
            if b is None:  # A passed its lease check, and is paused here
                a.stop_heartbeat()
                time.sleep(1.2)
                b = ObjectLease(s, {"pid": 2, "host": "b", "command": "writer B"}).acquire()
                fence.hold(url, b)
                pulled = tmp_path / "b"
                pulled.mkdir()
                assert s.pull_staging("sample", 1, "a" * 16, pulled) == 1, "B resumes A's shard"
                s.publish(man, local)
                committed = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
                assert not any("/.staging/" in p for p in committed), "B's commit cleaned up"
                fence.hold(url, a)  # A resumes
            return put_file(*args, **kwargs)

        s.fs.put_file = takeover_then_put  # type: ignore[method-assign]
        with pytest.raises(LeaseLostError, match="lost the lease"):
            s.push_shard("sample", 1, "a" * 16, local / "part-00000.parquet", marker)
        s.fs.put_file = put_file  # type: ignore[method-assign]
        after = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
        assert after == committed, "A's late uploads were removed again"
        assert not s.validate("sample", 1)
    finally:
        s.fs.put_file = put_file  # type: ignore[method-assign]
        fence.drop(url, fence.fence_of(url))  # type: ignore[arg-type]
        a.stop_heartbeat()
        if b is not None:
            b.release()


def test_fencing_a_paused_writer_publishes_and_deletes_nothing_on_object_storage(
    clean: str, tmp_path: Path, s3: dict[str, str]
) -> None:
    """Machine A is paused (SIGSTOP) mid-sampling past its lease's expiry; machine B takes the
    lease over and commits; A, resumed (SIGCONT), adds, replaces and deletes nothing in the
    bucket, exits 1 with one line, and B's rows are intact."""
    url = f"s3://{BUCKET}/fenced"
    s = store(url)
    log = tmp_path / "a.log"
    env_a = {**machine(tmp_path, "a"), "MPD_LEASE_S": str(LEASE_S)}
    proc = start_mid_sampling(clean, url, env_a, log)
    try:
        wait_for_a_shard(s, proc, log)
        pause_outside_lease_steps(proc, local_copy(url, env_a) / ".lock")
        time.sleep(LEASE_S + 1)  # past A's expiry: A's lease is stale, A is alive
        env_b = machine(tmp_path, "b")
        out = ok(run(url, env_b))
        assert "recovered a stale lock" in out.stderr
        b_token = json.loads(s.fs.cat_file(s.path(".lock")))["generation"]
        committed = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
        resume_and_wait(proc)
    finally:
        stop_group(proc)
    errors = fenced_out(log.read_text())
    assert proc.returncode == 1 and len(errors) == 1, log.read_text()[-3000:]
    assert "lost the lease" in errors[0] and f"(token {b_token}" in errors[0], errors
    after = {p: i["ETag"] for p, i in s.fs.find(s.root, detail=True).items()}
    assert after == committed, "A published, replaced and deleted nothing"
    assert status(url, env_b, "--verify")["1/sample"][0] == "done"
    assert sample_rows(url, env_b) == sample_rows(clean, env_b)


def test_the_manifest_is_uploaded_last_and_readers_follow_it(
    s3: dict[str, str], tmp_path: Path
) -> None:
    """A publication that fails half-way leaves the previous commit readable as it was; the
    new objects it did upload are under their own prefix, named by no manifest."""
    s = store(f"s3://{BUCKET}/protocol")
    local = tmp_path / "round"
    local.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), local / "part-00000.parquet")
    entry = FileEntry("part-00000.parquet", (local / "part-00000.parquet").stat().st_size, "", 2)
    man = Manifest("sample", 1, "a" * 64, [entry], 2, 0.0, 0.0, 0.0, "test")
    first = s.publish(man, local)
    assert s.manifest("sample", 1).objects == first.objects
    broken = Manifest.from_dict(
        {
            **man.to_dict(),
            "key": "b" * 64,
            "files": [
                *man.to_dict()["files"],
                {"path": "part-00001.parquet", "bytes": 1, "sha256": "", "rows": 1},
            ],
        }
    )
    with pytest.raises(FileNotFoundError):
        s.publish(broken, local)  # its second file is missing locally: the upload stops
    assert s.manifest("sample", 1).objects == first.objects
    assert not s.validate("sample", 1, deep=True)
    orphans = [p for p in s.fs.ls(s.round_path("sample", 1)) if p.rsplit("/", 1)[1].startswith("b")]
    assert orphans, "the failed publication's objects are under their own prefix"
    assert s.retract("sample", 1) and s.manifest("sample", 1) is None
    assert not s.fs.exists(s.round_path("sample", 1) + "/" + first.objects)


def test_moving_a_local_workspace_to_object_storage(
    clean_run: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """What the docs tell a user with a local workspace: run it once as the working copy of
    the new URL. Every stage is found valid locally and published, nothing is recomputed, and
    another machine then finds the whole campaign in the bucket."""
    clean, machine_a = clean_run
    local = tmp_path / "runs" / "tiny"
    shutil.copytree(local_copy(clean, machine_a), local)
    # Make it what a local run leaves: no object-storage marker, manifests without objects.
    (local / REMOTE_FILE).unlink()
    for path in local.glob("*/round=*/_manifest.json"):
        man = json.loads(path.read_text())
        man["objects"], man["files"] = "", [{**f, "etag": None} for f in man["files"]]
        path.write_text(json.dumps(man))
    url = f"s3://{BUCKET}/moved"
    env = machine(tmp_path, "a")
    ok(mpd(env, "run", "-w", url, "--set", f"storage.cache={local}", "--rounds", 1, *sets()))
    assert set(outcomes_at(local).values()) == {"cached"}
    rows = status(url, machine(tmp_path, "analyst"), "--verify")
    assert {st for st, _ in rows.values()} == {"done"}
    assert sample_rows(url, env) == sample_rows(clean, env)
    assert json.loads((local / REMOTE_FILE).read_text())["url"] == url


def test_a_missing_bucket_or_an_empty_prefix_is_one_line(
    s3: dict[str, str], tmp_path: Path
) -> None:
    env = machine(tmp_path, "a")
    for args in (
        ("run", "-w", "s3://no-such-bucket/ws", "--rounds", 0),
        ("status", "-w", "s3://no-such-bucket/ws"),
        ("sql", "-w", "s3://no-such-bucket/ws", "select 1"),
        ("status", "-w", f"s3://{BUCKET}/never-written"),
    ):
        out = mpd(env, *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("mpd: error:")]
        assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "no-such-bucket' does not exist" in errors[0] or "holds nothing" in errors[0]

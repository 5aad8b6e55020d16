"""The round DAG end to end: caching, resume after kill -9, retries, failures, rerun.

Every test drives the real ``mpd`` command (``python -m flows.cli``) against a workspace
under tmp_path, with the real Prefect API (the session's ``prefect_api`` server), the shipped
world (installed into each workspace by ``mpd run``) and tiny budgets, then reads what the run
left on disk: manifests, ``.mpd/last_run.json``, ``mpd status``, ``mpd sql``.

One 1-round campaign (``base``) and its 2-round continuation (``two_rounds``) are computed once
per module; a test that changes a workspace works on a copy of one of them.

With 48 generated tokens nearly every trace is truncated and the built-in filter would keep
nothing, so the campaign runs a user filter SQL file (``fixtures/keep_first_filter.sql``) that
keeps the first rewrite of every problem: rounds complete, and user SQL is exercised.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from data.store import StageStore
from tests.fencing import (
    LEASE_S,
    fenced_out,
    pause_outside_lease_steps,
    resume_and_wait,
    stop_group,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[1]
KEEP_FIRST = Path(__file__).resolve().parent / "fixtures" / "keep_first_filter.sql"
ROUND_STAGES = ["sample", "rewrite", "score", "filter", "train", "eval"]
SAMPLE_SHARDS = 8  # problems_per_round / shard_size: a kill during sampling has room to land
TINY: dict[str, object] = {
    "problems.n_train": 40,
    "problems.n_test": 10,
    "problems.n_heldout": 5,
    "sample.problems_per_round": SAMPLE_SHARDS,
    "sample.n": 1,
    "sample.shard_size": 1,
    "sample.max_tokens": 48,
    "rewrite.max_tokens": 48,
    "score.context": "rewrite",
    "filter.ratio": 10,
    "filter.sql": KEEP_FIRST,
    "train.steps": 3,
    "train.batch_size": 2,
    "train.checkpoint_every": 1,
    "evaluate.limit": 2,
    "evaluate.max_tokens": 16,
}
# One torch thread per run: the suite shares two cores, and oversubscribed torch threads
# make a tiny model's decode loop ~10x slower. A wide terminal keeps `mpd status` rows whole.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "250"}


# -- driving mpd ---------------------------------------------------------------------------
def sets(changes: dict[str, object] | None = None) -> list[str]:
    """``--set`` arguments for TINY with ``changes`` applied (None unsets a key)."""
    merged = {**TINY, **(changes or {})}
    return [a for k, v in merged.items() for a in ("--set", f"{k}={'' if v is None else v}")]


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *map(str, args)]


def mpd(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV},
        timeout=600,
    )


def run(ws: Path, rounds: int = 1, changes: dict[str, object] | None = None):
    return mpd("run", "-w", ws, "--rounds", rounds, *sets(changes))


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start(
    ws: Path,
    log: Path,
    rounds: int = 1,
    changes: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
):
    """``mpd run`` in the background, in its own process group (killed as a whole)."""
    with open(log, "w") as fh:
        return subprocess.Popen(
            command("run", "-w", ws, "--rounds", rounds, *sets(changes)),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **ENV, **(env or {})},
            start_new_session=True,
        )


def wait_for(ws: Path, pattern: str, proc: subprocess.Popen, log: Path) -> list[Path]:
    """Poll the workspace until ``pattern`` matches; fail if the run ends first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if found := sorted(ws.glob(pattern)):
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {pattern} appeared:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"{pattern} never appeared")


def kill9(proc: subprocess.Popen) -> None:
    """kill -9 the run's whole process group (what an OOM killer or a lost node does)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- reading the workspace -----------------------------------------------------------------
def planned(rounds: int) -> list[str]:
    return ["0/eval", *(f"{r}/{s}" for r in range(1, rounds + 1) for s in ROUND_STAGES)]


def outcomes(ws: Path) -> dict[str, str]:
    """What the last run did per "round/stage": done (computed), cached or failed."""
    stages = json.loads((ws / ".mpd" / "last_run.json").read_text())["stages"]
    return {where: o["state"] for where, o in stages.items()}


def manifests(ws: Path) -> dict[str, dict]:
    """Every committed round stage's manifest, by "round/stage"."""
    out = {}
    for path in ws.glob("*/round=*/_manifest.json"):
        man = json.loads(path.read_text())
        if man["stage"] in ROUND_STAGES:
            out[f"{man['round']}/{man['stage']}"] = man
    return out


def finished(ws: Path) -> dict[str, float]:
    return {where: m["finished_at"] for where, m in manifests(ws).items()}


def status(ws: Path, rounds: int) -> dict[str, tuple[str, str]]:
    """``mpd status`` parsed: "round/stage" -> (state, detail)."""
    out = ok(mpd("status", "-w", ws, "--set", f"rounds={rounds}"))
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 9 and cells[1].isdigit():
            rows[f"{cells[1]}/{cells[2]}"] = (cells[3], cells[7])
    return rows


def table(ws: Path, stage: str, round_: int) -> pa.Table:
    """A committed stage output, read the way the next stage reads it."""
    from tasks.common import read_stage

    return read_stage(StageStore(ws), stage, round_)


def sql(ws: Path, query: str) -> list[dict]:
    return json.loads(ok(mpd("sql", "-w", ws, "--format", "json", query)).stdout)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("mpd: error:")]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- shared campaigns ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-round campaign, computed once (its first run computes every stage)."""
    ws = tmp_path_factory.mktemp("base") / "ws"
    ok(run(ws))
    assert set(outcomes(ws).values()) == {"done"}
    return ws


@pytest.fixture(scope="module")
def base_finished(base: Path) -> dict[str, float]:
    """When each of base's stages was committed (copies of base carry the same manifests)."""
    return finished(base)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory, base: Path, base_finished) -> Path:
    """The base campaign continued to round 2 (in a copy: base stays a 1-round campaign)."""
    ws = copy(base, tmp_path_factory.mktemp("two") / "ws")
    ok(run(ws, rounds=2))
    return ws


# -- the tests -----------------------------------------------------------------------------
def test_identical_rerun_computes_nothing(base: Path, base_finished: dict[str, float]) -> None:
    """A second identical run reuses every stage: all "cached", no manifest rewritten."""
    out = ok(run(base))
    assert outcomes(base) == dict.fromkeys(planned(1), "cached")
    assert finished(base) == base_finished
    assert " done:" not in out.stderr and "resuming" not in out.stderr


def test_more_rounds_runs_only_the_new_round(
    two_rounds: Path, base: Path, base_finished: dict[str, float]
) -> None:
    """``--rounds 2`` after a 1-round run computes round 2 only, from round 1's student."""
    assert outcomes(two_rounds) == {
        **dict.fromkeys(planned(1), "cached"),
        **{f"2/{s}": "done" for s in ROUND_STAGES},
    }
    after = finished(two_rounds)
    assert {w: after[w] for w in planned(1)} == base_finished
    assert set(after) == set(planned(2))
    # Round 2 sampled with round 1's trained student (its identity is train r1's key).
    train1 = manifests(two_rounds)["1/train"]["key"][:12]
    assert set(table(two_rounds, "sample", 2).column("model").to_pylist()) == {train1}
    assert train1 not in table(two_rounds, "sample", 1).column("model").to_pylist()


def _downstream_of_filter(before: dict[str, dict], after: dict[str, dict], ws: Path) -> None:
    """Round 1's sample/rewrite/score reused; its filter/train/eval and all of round 2 redone."""
    reused = ["0/eval", "1/sample", "1/rewrite", "1/score"]
    redone = ["1/filter", "1/train", "1/eval", *(f"2/{s}" for s in ROUND_STAGES)]
    assert outcomes(ws) == {**dict.fromkeys(reused, "cached"), **dict.fromkeys(redone, "done")}
    for where in reused:
        assert after[where]["finished_at"] == before[where]["finished_at"], where
    for where in redone:
        assert after[where]["finished_at"] > before[where]["finished_at"], where


def test_changing_the_filter_recomputes_only_downstream(two_rounds: Path, tmp_path: Path) -> None:
    """A new filter ratio re-runs filter, train, eval of round 1 and every stage of round 2,
    and not sample, rewrite, score (their keys do not depend on the filter)."""
    ws = copy(two_rounds, tmp_path / "ws")
    before = manifests(ws)
    ok(run(ws, rounds=2, changes={"filter.ratio": 5}))
    after = manifests(ws)
    _downstream_of_filter(before, after, ws)
    for where in ["1/filter", "1/train", "1/eval", "2/sample"]:
        assert after[where]["key"] != before[where]["key"], where


def test_editing_code_a_stage_imports_recomputes_that_stage_only(
    base: Path, tmp_path: Path
) -> None:
    """Stage keys cover the code a stage reaches: a comment added to ``train/losses.py``, which
    the train stage imports only through its trainer, recomputes train and what reads its
    student (eval); sample, rewrite, score and filter, which never import it, stay cached."""
    code = tmp_path / "code"
    code.mkdir()
    for entry in REPO.iterdir():
        if entry.name in {"data", "engines", "flows", "tasks", "train"}:
            shutil.copytree(entry, code / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        elif not entry.name.startswith("."):
            (code / entry.name).symlink_to(entry)
    losses = code / "train" / "losses.py"
    losses.write_text(losses.read_text() + "\n# edited by a test: the train stage's key changes\n")
    ws = copy(base, tmp_path / "ws")
    before = manifests(ws)
    proc = subprocess.run(
        command("run", "-w", ws, "--rounds", 1, *sets()),
        capture_output=True,
        text=True,
        cwd=code,
        env={**os.environ, **ENV, "PYTHONPATH": str(code)},
        timeout=600,
    )
    ok(proc)
    after = manifests(ws)
    reused, redone = (
        ["0/eval", "1/sample", "1/rewrite", "1/score", "1/filter"],
        ["1/train", "1/eval"],
    )
    assert outcomes(ws) == {**dict.fromkeys(reused, "cached"), **dict.fromkeys(redone, "done")}
    for where in redone:
        assert after[where]["key"] != before[where]["key"], where
    # train's own code changed; eval's did not (it recomputes because it reads a new student).
    assert after["1/train"]["code_version"] != before["1/train"]["code_version"]
    assert after["1/eval"]["code_version"] == before["1/eval"]["code_version"]


def test_score_mass_stores_fewer_candidates_and_trains_on_them(base: Path, tmp_path: Path) -> None:
    """``score.mass`` keeps per token only the candidates whose probability reaches it: the
    score stage recomputes (its config changed) and stores fewer ids with their counts, the
    filter stays cached, and training reads the shorter rows to a finite loss."""
    ws = copy(base, tmp_path / "ws")
    ok(run(ws, changes={"score.mass": 0.9}))
    assert outcomes(ws) == {
        **dict.fromkeys(["0/eval", "1/sample", "1/rewrite", "1/filter"], "cached"),
        **dict.fromkeys(["1/score", "1/train", "1/eval"], "done"),
    }
    (row,) = sql(
        ws,
        "select sum(len(topk_ids)) as stored, sum(num_tokens * k) as full_k, "
        "sum(len(topk_counts)) as positions, sum(num_tokens) as tokens, "
        "sum(list_sum(topk_counts)) as counted from scores",
    )
    assert 0 < row["stored"] < row["full_k"] and row["counted"] == row["stored"]
    assert row["positions"] == row["tokens"]
    losses = [r["loss"] for r in sql(ws, "select loss from train_log where round = 1")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_the_world_round_trains_the_same_from_the_examples_file(base: Path, tmp_path: Path) -> None:
    """The base campaign's round 1 (the test world's targets, decisions and scores): its examples
    as the list the train stage built before and as the memory-mapped file it writes now give
    the same batches at every step, and training over each gives the same losses and weights
    (so the round's student, and `make run`'s table, are what they were)."""
    import torch

    from tasks.common import stage_files
    from tasks.train import build_examples, example_prompts, training_rows
    from train.config import TrainConfig
    from train.example_file import open_examples, write_examples
    from train.models import load_model, load_tokenizer
    from train.trainer import train

    store = StageStore(base)

    def rows():
        return training_rows(
            stage_files(store, "rewrite", 1),
            decisions=stage_files(store, "filter", 1),
            scores=stage_files(store, "score", 1),
        )

    problems = {r["problem_id"]: r for r in table(base, "problems", 0).to_pylist()}
    model = base / "train" / "round=1" / "model"
    tok = load_tokenizer(model)
    listed = list(build_examples(rows(), problems, tok))
    write_examples(tmp_path / "examples.arrow", rows(), example_prompts(problems, tok))
    stored = open_examples(tmp_path / "examples.arrow")
    assert len(stored) == len(listed) > 0
    cfg = TrainConfig(steps=TINY["train.steps"], batch_size=TINY["train.batch_size"])
    runs = [
        train(load_model(model, device="cpu"), data, cfg, tokenizer=tok, seed=0)
        for data in (listed, stored)
    ]
    assert [(r["tokens"], r["loss"]) for r in runs[0].log] == [
        (r["tokens"], r["loss"]) for r in runs[1].log
    ]
    for (name, a), (_, b) in zip(
        runs[0].model.named_parameters(), runs[1].model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_rerun_from_filter_recomputes_only_downstream(two_rounds: Path, tmp_path: Path) -> None:
    """``mpd rerun --round 1 --from filter`` moves filter onward (and round 2) aside and
    recomputes exactly those, under the same keys; sample, rewrite, score stay."""
    ws = copy(two_rounds, tmp_path / "ws")
    before = manifests(ws)
    out = ok(mpd("rerun", "-w", ws, "--round", 1, "--from", "filter", "--rounds", 2, *sets()))
    assert (
        "invalidated: filter r1, train r1, eval r1, sample r2, rewrite r2, score r2, "
        "filter r2, train r2, eval r2" in out.stderr
    )
    after = manifests(ws)
    _downstream_of_filter(before, after, ws)
    assert {w: m["key"] for w, m in after.items()} == {w: m["key"] for w, m in before.items()}


def test_kill_during_sampling_resumes_finished_shards(
    base: Path, base_finished: dict[str, float], tmp_path: Path
) -> None:
    """kill -9 while sampling keeps the finished shards; the next run reuses exactly those
    (same files, not regenerated), redoes the rest, and commits the same rows as the
    uninterrupted base run; downstream stages keep their keys and stay cached."""
    ws = copy(base, tmp_path / "ws")
    shutil.rmtree(ws / "sample" / "round=1")  # round 1 must be sampled again
    log = tmp_path / "killed.log"
    proc = start(ws, log)
    try:
        wait_for(ws, ".staging/sample/round=1/*/_shards/part-*.json", proc, log)
    finally:
        kill9(proc)
    staging = next((ws / ".staging" / "sample" / "round=1").iterdir())
    kept = {p.name: p.stat().st_ino for p in staging.glob("part-*.parquet")}
    markers = list((staging / "_shards").glob("*.json"))
    assert 1 <= len(markers) < SAMPLE_SHARDS, "the kill landed mid-sampling"
    assert len(kept) >= len(markers)  # a shard renamed but not yet marked is redone
    assert not (ws / "sample" / "round=1").exists(), "nothing half-done was committed"
    assert status(ws, 1)["1/sample"] == ("partial", f"{len(markers)} shard(s)")

    out = ok(run(ws))
    n = len(markers)
    assert f"round 1 sample   resuming: {n} finished shard(s) reused" in out.stderr
    assert out.stderr.count("round 1 sample   shard ") == SAMPLE_SHARDS - n
    man = manifests(ws)["1/sample"]
    assert man["resumed_shards"] == n
    for m in markers:
        name = m.name.removesuffix(".json")
        assert (ws / "sample" / "round=1" / name).stat().st_ino == kept[name], name
    assert outcomes(ws) == {
        **dict.fromkeys(planned(1), "cached"),
        "1/sample": "done",
    }

    def rows(w: Path) -> list[tuple]:
        t = table(w, "sample", 1)
        cols = [t.column(c).to_pylist() for c in ("problem_id", "sample_idx", "token_ids")]
        return sorted(zip(*cols, strict=True))

    assert len(rows(ws)) == SAMPLE_SHARDS
    assert rows(ws) == rows(base)
    assert finished(ws)["1/rewrite"] == base_finished["1/rewrite"]


def test_fencing_a_paused_writer_publishes_and_deletes_nothing(base: Path, tmp_path: Path) -> None:
    """A run paused (SIGSTOP) mid-sampling past its lease's expiry loses the workspace to a
    second run, which commits; resumed (SIGCONT), the first changes nothing in the workspace
    (no commit, no delete, no bookkeeping), exits 1 with one line, and the second's rows stand."""
    ws = copy(base, tmp_path / "ws")
    shutil.rmtree(ws / "sample" / "round=1")  # round 1 must be sampled again
    log = tmp_path / "a.log"
    proc = start(ws, log, env={"MPD_LEASE_S": str(LEASE_S)})
    try:
        wait_for(ws, ".staging/sample/round=1/*/_shards/part-*.json", proc, log)
        pause_outside_lease_steps(proc, ws / ".lock")
        time.sleep(LEASE_S + 1)  # past the first run's expiry: stale, though alive
        out = ok(run(ws))
        assert "recovered a stale lock" in out.stderr
        token = json.loads((ws / ".lock").read_text())["generation"]
        committed = _every_file(ws)
        resume_and_wait(proc)
    finally:
        stop_group(proc)
    errors = fenced_out(log.read_text())
    assert proc.returncode == 1 and len(errors) == 1, log.read_text()[-3000:]
    assert "lost the lease" in errors[0] and f"(token {token}" in errors[0], errors
    assert _every_file(ws) == committed, "the first run wrote, replaced or deleted nothing"
    assert sorted(table(ws, "sample", 1).to_pylist(), key=str) == sorted(
        table(base, "sample", 1).to_pylist(), key=str
    )
    assert status(ws, 1)["1/sample"][0] == "done"


def _every_file(ws: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the workspace: (inode, size, mtime) by relative path."""
    out = {}
    for path in ws.rglob("*"):
        if path.is_file():
            st = path.stat()
            out[path.relative_to(ws).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_kill_during_training_resumes_from_checkpoint(base: Path, tmp_path: Path) -> None:
    """While a run trains, a concurrent ``mpd rerun`` on its workspace is refused naming the
    holder, before moving anything aside (``mpd run`` refused by a holder: test_cli.py); after
    kill -9 the next run resumes training from the last checkpoint, and the train log has
    every step exactly once."""
    ws = copy(base, tmp_path / "ws")
    committed = manifests(ws)
    longer = {"train.steps": 30, "train.checkpoint_every": 5}
    log = tmp_path / "killed.log"
    proc = start(ws, log, changes=longer)
    try:
        wait_for(ws, ".staging/train/round=1/*/checkpoints/step-*", proc, log)
        os.killpg(proc.pid, signal.SIGSTOP)  # hold it there: a live run, holding the lock
        second = mpd("rerun", "-w", ws, "--round", 1, "--from", "sample", *sets(longer))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        (line,) = error_lines(second)
        assert f"is in use by pid {proc.pid} " in line and "cli.py run -w" in line
        assert manifests(ws) == committed, "the refused rerun invalidated nothing"
    finally:
        kill9(proc)
    ckpts = sorted((ws / ".staging" / "train" / "round=1").glob("*/checkpoints/step-*"))
    last = max(int(p.name.split("-")[1]) for p in ckpts if (p / "state.json").is_file())
    assert 5 <= last < 30

    out = ok(run(ws, changes=longer))
    extra = manifests(ws)["1/train"]["extra"]
    assert extra["resumed_from"] == last
    assert outcomes(ws) == {
        **dict.fromkeys(planned(1), "cached"),
        "1/train": "done",
        "1/eval": "done",
    }
    assert sorted(table(ws, "train", 1).column("step").to_pylist()) == list(range(1, 31))
    assert "round 1 train    step 30/30" in out.stderr
    assert not list((ws / "train" / "round=1").glob("checkpoints")), "checkpoints not shipped"


def test_transient_stage_failure_is_retried_and_resumes(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage task retries a transient failure (here a lost connection after one shard, and
    an object store that did not answer), and the retry reuses the shards the failed attempt
    finished; a user mistake, memory out and a bug (data.errors) fail at once, unretried."""
    import torch
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from data.errors import UserError
    from data.objstore import ObjectStore
    from data.storage_errors import StorageUnreachableError
    from tasks.common import run_stage
    from tasks.prefect_stage import stage_task
    from tests.conftest import free_port

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # botocore asks before it dials
        monkeypatch.setenv(name, "mpd-test")
    gone = ObjectStore(  # a real S3 client, at a port nobody listens on
        "s3://mpd-gone/ws",
        {
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
            "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    )

    store = StageStore(tmp_path / "ws")
    schema = pa.schema([pa.field("x", pa.int64(), nullable=False)])
    attempts: list[list[int]] = []

    def flaky(writer) -> dict:
        attempts.append(sorted(writer.resumed))
        for i in range(3):
            if i not in writer.resumed:
                writer.write_shard(i, pa.table({"x": [i]}), schema)
            if i == 1 and len(attempts) == 1:
                raise ConnectionError("the engine server went away")
        return {}

    def store_gone_once(writer) -> dict:
        attempts.append(sorted(writer.resumed))
        if len(attempts) == 1:
            gone.committed()  # the store does not answer: StorageUnreachableError
        writer.write_shard(0, pa.table({"x": [0]}), schema)
        return {}

    def out_of_memory(writer) -> dict:
        attempts.append(sorted(writer.resumed))
        torch.empty(2**60)  # torch's CPU allocator refuses 4 EiB at once (reserves nothing)
        return {}

    def mistaken(writer) -> dict:
        attempts.append(sorted(writer.resumed))
        raise UserError("a user mistake")

    def buggy(writer) -> dict:
        attempts.append(sorted(writer.resumed))
        raise ValueError("a bug: zip(strict=True) found lists of different lengths")

    @flow(name="mpd-retry-probe")
    def probe(stage: str, compute) -> object:
        key = stage.ljust(64, "0")
        return stage_task(
            workspace=str(store.workspace),
            stage=stage,
            round_=1,
            key=key,
            run=lambda: run_stage(store, stage, 1, key, compute),
        )

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        result = probe("sample", flaky)
        assert attempts == [[], [0, 1]], "retried once, resuming the two finished shards"
        assert result.rows == 3 and not result.cached
        man = store.manifest("sample", 1)
        assert man is not None and man.resumed_shards == 2 and man.rows == 3

        attempts.clear()
        assert probe("truncate", store_gone_once).rows == 1
        assert attempts == [[], []], "a store that did not answer is retried"
        with pytest.raises(StorageUnreachableError):
            gone.committed()  # what the first attempt met

        attempts.clear()
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            probe("filter", out_of_memory)
        assert attempts == [[]], "memory out is not retried"

        attempts.clear()
        with pytest.raises(UserError, match="a user mistake"):
            probe("rewrite", mistaken)
        assert attempts == [[]], "a user mistake is not retried"

        attempts.clear()
        with pytest.raises(ValueError, match="a bug"):
            probe("score", buggy)
        assert attempts == [[]], "a bug is not retried"


def test_prefect_cache_hits_only_a_valid_output_of_this_workspace(tmp_path: Path) -> None:
    """The stage task's cache key exists only while the committed output validates in full
    (a same-size corruption is a miss, as for run_stage), and differs between workspaces: a
    cached result names paths (the trained student's) in the workspace that computed it."""
    from tasks.prefect_stage import StageKeyPolicy

    store = StageStore(tmp_path / "a")
    key = "k" * 64
    writer = store.writer("sample", 1, key)
    writer.write_shard(0, pa.table({"x": list(range(100))}), pa.schema([("x", pa.int64())]))
    writer.commit()
    copy(tmp_path / "a", tmp_path / "b")

    def cache_key(ws: Path) -> str | None:
        inputs = {"workspace": str(ws), "stage": "sample", "round_": 1, "key": key}
        return StageKeyPolicy().compute_key(None, inputs, {})

    a, b = cache_key(tmp_path / "a"), cache_key(tmp_path / "b")
    assert a is not None and b is not None and a != b
    part = tmp_path / "b" / "sample" / "round=1" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert cache_key(tmp_path / "b") is None
    assert cache_key(tmp_path / "a") == a


def test_failed_stage_is_reported_and_the_next_run_resumes_there(
    base: Path, base_finished: dict[str, float], tmp_path: Path
) -> None:
    """A filter whose rows do not fit the round (here: every candidate twice, which would have
    doubled the training data) fails the run with one line (exit 2, no traceback) and commits
    nothing; ``mpd status`` names the failed stage and its error; once the file is fixed, the
    next run computes from the filter on and reuses sample, rewrite, score. (A filter that does
    not even parse or bind never gets this far: the preflight refuses it before Prefect.)"""
    ws = copy(base, tmp_path / "ws")
    committed = (ws / "filter" / "round=1" / "_manifest.json").read_text()
    user_sql = tmp_path / "my_filter.sql"
    body = KEEP_FIRST.read_text().replace("ORDER BY problem_id, sample_idx", "")
    user_sql.write_text(f"{body} UNION ALL {body}")
    failed = run(ws, changes={"filter.sql": user_sql})
    assert failed.returncode == 2
    (line,) = error_lines(failed)
    assert line.startswith("mpd: error: filter.sql returned 2 rows for candidate"), line
    # the doubled decisions were not committed: round 1's filter is still the base run's
    assert (ws / "filter" / "round=1" / "_manifest.json").read_text() == committed
    assert "Traceback" not in failed.stderr and "leaked" not in failed.stderr
    assert outcomes(ws) == {
        **dict.fromkeys(["0/eval", "1/sample", "1/rewrite", "1/score"], "cached"),
        "1/filter": "failed",
    }
    shown = status(ws, 1)
    assert shown["1/filter"][0] == "failed" and "returned 2 rows" in shown["1/filter"][1]
    for where in ["0/eval", "1/sample", "1/rewrite", "1/score"]:
        assert shown[where][0] == "cached", where

    # fixed (not a copy of the base run's rule: the key holds the file's content, and the same
    # content would find the base run's decisions committed with the same key)
    user_sql.write_text(KEEP_FIRST.read_text() + "\n-- fixed: one row per candidate\n")
    ok(run(ws, changes={"filter.sql": user_sql}))
    assert outcomes(ws) == {
        **dict.fromkeys(["0/eval", "1/sample", "1/rewrite", "1/score"], "cached"),
        **dict.fromkeys(["1/filter", "1/train", "1/eval"], "done"),
    }
    after = finished(ws)
    for where in ["1/sample", "1/rewrite", "1/score"]:
        assert after[where] == base_finished[where], where


def test_filter_keeping_nothing_stops_the_round(base: Path, tmp_path: Path) -> None:
    """The built-in filter with an impossible ratio keeps no rewrite: the run stops with one
    line saying so and how to inspect the decisions, and trains and evaluates nothing."""
    ws = copy(base, tmp_path / "ws")
    strict = {"filter.sql": None, "filter.ratio": 0.001}
    out = mpd("rerun", "-w", ws, "--round", 1, "--from", "filter", *sets(strict))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = error_lines(out)
    assert line.startswith(f"mpd: error: round 1: the filter kept none of {SAMPLE_SHARDS} rewrites")
    assert "nothing was trained" in line and "select * from decisions where round = 1" in line
    assert not (ws / "train" / "round=1").exists() and not (ws / "eval" / "round=1").exists()
    assert not (ws / ".staging" / "train").exists()
    decisions = sql(ws, "select kept, count(*) as n from decisions where round = 1 group by kept")
    assert decisions == [{"kept": False, "n": SAMPLE_SHARDS}]
    assert outcomes(ws)["1/filter"] == "done" and "1/train" not in outcomes(ws)


def test_status_keys_derives_every_committed_key_and_names_the_libraries(base: Path) -> None:
    """``mpd status --keys`` computes every key from the config and the declarations alone and
    finds the run's own (the derivation a run uses is the one shown), with what went into each:
    the library versions of the interpreter that computed it among them."""
    import importlib.metadata

    out = ok(mpd("status", "--keys", "-w", base, *sets())).stdout
    heads = {line.split()[2]: line for line in out.splitlines() if line.startswith("round 1 ")}
    assert list(heads) == ROUND_STAGES
    for line in heads.values():
        assert "committed with this key: cached" in line, line
    assert "round 0 problems" in out and "round 0 eval" in out
    libraries = [line for line in out.splitlines() if line.strip().startswith("libraries")]
    assert len(libraries) >= len(ROUND_STAGES)
    blocks = {b.split()[0]: b for b in out.split("round 1 ")[1:]}  # stage -> its lines
    problems = out.split("round 0 problems")[1].split("round 0 ")[0]

    def shown(dist: str) -> str:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} absent"

    for dist in ("torch", "transformers", "peft"):
        assert shown(dist) in blocks["train"], blocks["train"]
    for dist in ("datasets", "reasoning-gym"):
        assert shown(dist) in problems, problems
    assert "filter.sql" in blocks["filter"]  # the filter's SQL file, by content


def test_round_publishes_prefect_artifacts_and_shard_tasks(base: Path) -> None:
    """The Prefect UI shows each round: table + markdown artifacts, progress, one task per shard."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=[
                        "mpd-ws-round-summary",
                        "mpd-ws-round-0",
                        "mpd-ws-round-1",
                        "sample-round-1-progress",
                        "eval-round-1-progress",
                    ]
                )
            )
        )
        shard_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(
                    any_=[f"sample-round-1-shard-{i}" for i in range(SAMPLE_SHARDS)]
                )
            )
        )
    by_key: dict[str, list] = {}
    for a in arts:  # several versions per key: other tests rerun copies of this workspace
        by_key.setdefault(a.key, []).append(a)
    assert set(by_key) == {
        "mpd-ws-round-summary",
        "mpd-ws-round-0",
        "mpd-ws-round-1",
        "sample-round-1-progress",
        "eval-round-1-progress",
    }
    reports = [a.data for a in by_key["mpd-ws-round-1"]]
    assert any("# Round 1" in r and "## Drop reasons" in r and "vs round 0" in r for r in reports)
    assert {a.type for a in by_key["mpd-ws-round-summary"]} == {"table"}
    assert 100.0 in {a.data for a in by_key["sample-round-1-progress"]}
    # every sampling shard ran as its own Prefect task, through the flow's task runner
    completed = {t.name for t in shard_runs if t.state_name == "Completed"}
    assert completed == {f"sample-round-1-shard-{i}" for i in range(SAMPLE_SHARDS)}

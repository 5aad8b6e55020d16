"""A full disk during a run: one line naming the path and what to free, exit 1, no traceback,
and the next run (space freed) resumes to the rows of a run that never met it.

One table of (case, what to recompute, room left on the disk, the path the error must name). A
row copies a computed one-round campaign onto a small tmpfs, drops the stages it recomputes,
fills the rest of the filesystem but the room given, and runs the real ``mpd run`` on it (a
real ENOSPC from the kernel, not a mocked write); then deletes the filler and runs again.

Mounting needs a private mount namespace: ``unshare --mount`` as root, or ``unshare --user
--map-root-user --mount`` where unprivileged user namespaces are allowed. Where neither works
(a locked-down CI runner) these rows skip, saying so; the rows of ``WRITERS`` below still
meet a real ENOSPC without mounting anything, from ``/dev/full``, at each writer's own file.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from data.errors import kind_of
from data.fsutil import atomic_write_bytes
from data.schemas import SAMPLES
from data.store import StageStore
from flows.sqlout import write_parquet_atomic
from tests.test_campaign import ENV, manifests, ok, outcomes, run, sets, table

# Whole `mpd run`s (about 2 minutes a file): `make test` runs them, `make test-fast` does not.
pytestmark = pytest.mark.slow

# (case, stage dirs of round 1 to drop, room left in bytes (None: 1.5 checkpoints), the path
# the one error line names)
CASES: list[tuple[str, list[str], int | None, str]] = [
    ("a train checkpoint", ["train", "eval"], None, "/checkpoints/step-000002"),
    ("a sample shard", ["sample", "rewrite", "score", "filter", "train", "eval"], 40_000,
     "/.staging/sample/round=1/"),
    ("no room at all: the lock's record", ["eval"], 0, "/ws/.lock"),
]  # fmt: skip

SCRIPT = """
set -u
mount -t tmpfs -o size=256m tmpfs "$MNT" || exit 90
cp -a "$SRC" "$MNT/ws"
"$PY" -c 'import os, sys
st = os.statvfs(sys.argv[1])
with open(sys.argv[1] + "/filler", "wb") as fh:
    os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - int(sys.argv[2]))' "$MNT" "$ROOM"
mpd() { "$PY" -m flows.cli run -w "$MNT/ws" "$@"; }
mpd "$@" >"$OUT/run1.log" 2>&1; echo $? >"$OUT/run1.rc"
cp -a "$MNT/ws" "$OUT/ws-after-failure"
rm "$MNT/filler"
mpd "$@" >"$OUT/run2.log" 2>&1; echo $? >"$OUT/run2.rc"
cp -a "$MNT/ws" "$OUT/ws"
"""


def _namespace(probe_dir: Path) -> list[str] | None:
    """How to get a private mount namespace that may mount a tmpfs here; None if no way."""
    if shutil.which("unshare") is None:
        return None
    probe_dir.mkdir(exist_ok=True)
    for way in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--user", "--map-root-user", "--mount"],
    ):
        mount = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(probe_dir))}"
        probe = subprocess.run([*way, "sh", "-c", mount], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return way
    return None


@pytest.fixture(scope="module")
def namespace(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    way = _namespace(tmp_path_factory.mktemp("probe") / "mnt")
    if way is None:
        pytest.skip(
            "cannot mount a small tmpfs here (needs root or unprivileged user namespaces for "
            "`unshare --mount`); the /dev/full rows still run"
        )
    return way


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A one-round campaign computed on an ordinary disk: the rows every case must reach."""
    ws = tmp_path_factory.mktemp("clean") / "ws"
    ok(run(ws))
    return ws


def _room_for_one_and_a_half_checkpoints(ws: Path) -> int:
    """A checkpoint holds the weights and AdamW's two moments: ~3x the model's file."""
    weights = (ws / "train" / "round=1" / "model" / "model.safetensors").stat().st_size
    return int(1.5 * 3 * weights)


@pytest.mark.parametrize(
    ("drop", "room", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_disk_full_is_one_line_and_the_next_run_resumes(
    namespace: list[str], clean: Path, tmp_path: Path, drop: list[str], room: int | None, names: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(clean, src, symlinks=True)
    for stage in drop:
        shutil.rmtree(src / stage / "round=1")
    (src / ".mpd" / "last_run.json").unlink()
    # No lease file yet, so that taking the lease needs room ("no room at all"): a released
    # lease's record (its fencing token) would be rewritten in the block it already has.
    (src / ".lock").unlink()
    out, mnt = tmp_path / "out", tmp_path / "mnt"
    out.mkdir()
    mnt.mkdir()
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "MNT": str(mnt),
        "SRC": str(src),
        "OUT": str(out),
        "PY": sys.executable,
        "ROOM": str(_room_for_one_and_a_half_checkpoints(clean) if room is None else room),
        # The content-digest cache (a small file per hashed file: 4 KiB each on a tmpfs) lives
        # off the full disk, so the room left is what the stage under test gets.
        "MPD_CACHE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [*namespace, "bash", "-c", SCRIPT, "disk-full", "--rounds", "1", *sets()],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = (out / "run1.log").read_text()
    assert (out / "run1.rc").read_text().strip() == "1", first[-3000:]
    assert "Traceback" not in first and "NoneType: None" not in first, first[-3000:]
    errors = [line for line in first.splitlines() if line.startswith("mpd: error:")]
    assert len(errors) == 1, first[-3000:]
    assert "disk full writing" in errors[0] and names in errors[0], errors[0]
    assert "free space there" in errors[0] and "free of" in errors[0], errors[0]
    # The failure gave back what it took: no partial file left holding the disk (finished
    # shards and checkpoints stay: the next run resumes from them).
    failed = out / "ws-after-failure"
    assert not [p for p in failed.rglob("*") if ".tmp" in p.name], "a temporary file was left"
    for keydir in failed.glob(".staging/*/round=*/*"):
        shards = {p.name for p in keydir.glob("part-*.parquet")}
        assert shards == {p.stem for p in keydir.glob("_shards/*.json")}, "unmarked shard left"

    second = (out / "run2.log").read_text()
    assert (out / "run2.rc").read_text().strip() == "0", second[-3000:]
    ws = out / "ws"
    assert {outcomes(ws)[f"1/{s}"] for s in drop} == {"done"}
    if "train" in drop and "sample" not in drop:
        assert manifests(ws)["1/train"]["extra"]["resumed_from"] == 1, "from the checkpoint"
    if "sample" in drop:
        assert "round 1 sample   resuming:" in second, "finished shards were reused"
    for stage in drop:  # every recomputed stage's rows are the clean run's
        assert _rows(ws, stage) == _rows(clean, stage), stage
    weights = "model/model.safetensors"
    assert _sha(ws, "train", weights) == _sha(clean, "train", weights)


def _rows(ws: Path, stage: str) -> list[tuple]:
    t = table(ws, stage, 1)
    volatile = {"elapsed_s"}  # wall time of a training step: the one column a rerun changes
    t = t.select([c for c in t.column_names if c not in volatile])
    return sorted(tuple(map(json.dumps, row.values())) for row in t.to_pylist())


def _sha(ws: Path, stage: str, path: str) -> str:
    (entry,) = [f for f in manifests(ws)[f"1/{stage}"]["files"] if f["path"] == path]
    return entry["sha256"]


# -- without mounting: a real ENOSPC from /dev/full at each writer's own temporary file ------
def _shard(ws: Path) -> None:
    """A stage writer whose shard's temporary file is /dev/full: its next write meets ENOSPC."""
    writer = StageStore(ws).writer("sample", 1, "f" * 64, code_version="test")
    (writer.dir / ".part-00000.parquet.tmp").symlink_to("/dev/full")
    row = {
        "round": 1, "problem_id": "a", "sample_idx": 0, "completion": "x", "token_ids": [1],
        "prompt_tokens": 1, "think_tokens": 0, "answer_tokens": 1, "total_tokens": 1,
        "finish_reason": "stop", "truncated": False, "correct": True, "pred_answer": "1",
        "model": "student",
    }  # fmt: skip
    writer.write_shard(0, pa.Table.from_pylist([row]), SAMPLES)


def _atomic(ws: Path) -> None:
    """An atomic write (a manifest, run.yaml) whose temporary file is /dev/full."""
    (ws / f".run.yaml.tmp-{os.getpid()}").symlink_to("/dev/full")
    atomic_write_bytes(ws / "run.yaml", b"rounds: 1\n" * 1000)


def _sql_out(ws: Path) -> None:
    """``mpd sql --out`` streaming a result into its temporary file, which is /dev/full."""
    (ws / f".kept.parquet.tmp-{os.getpid()}").symlink_to("/dev/full")
    write_parquet_atomic(pa.table({"a": list(range(10_000))}), ws / "kept.parquet")


WRITERS = [
    ("a stage shard", _shard),
    ("an atomic file write", _atomic),
    ("mpd sql --out", _sql_out),
]


@pytest.mark.parametrize("write", [w[1] for w in WRITERS], ids=[w[0] for w in WRITERS])
def test_a_full_disk_names_the_file_it_could_not_write(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "run.yaml").write_text("rounds: 1\n")
    with pytest.raises(Exception) as caught:  # its kind is what is checked
        write(ws)
    assert kind_of(caught.value) == "resource", repr(caught.value)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("disk full writing ") and str(ws) in line
    assert not list(ws.rglob(".*tmp*")), "the temporary file is removed"

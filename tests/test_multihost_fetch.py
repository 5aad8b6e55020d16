"""What a worker on another host is given, and how it gets a model: by content key, never a path.

On a local-disk workspace (the store kind that needs no server): an engine handle pickled for a
Dask worker holds no path of the flow's host (model or request journal); a worker fetches the
model directory once per process into its own cache, checked against the manifest's sha256;
a fetch that finds the object changed, or the stage replaced, fails in one line and leaves no
copy that a later process would reuse. The same on ``s3://``, across processes that cannot see
the flow's disk: ``tests/test_multihost.py``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from data import model_fetch
from data.errors import UserError
from data.model_fetch import StaleModelError, StoredModel, fetch, stored_model
from data.store import StageStore
from engines.config import EngineConfig
from tasks.engines import EngineHandle

KEY = "a" * 64


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's machine cache; the process forgets what it fetched before and after."""
    monkeypatch.setenv("MPD_CACHE_DIR", str(tmp_path / "cache"))
    model_fetch.forget()
    yield tmp_path / "cache"
    model_fetch.forget()


def committed_model(ws: Path, key: str = KEY, weights: bytes = b"w" * 4096) -> Path:
    """A train stage committed with a model directory (what each round's student is)."""
    writer = StageStore(ws).writer("train", 1, key)
    writer.path("model/config.json").write_text('{"tiny": true}')
    writer.path("model/weights.bin").write_bytes(weights)
    writer.path("log.json").write_text("{}")  # not part of the model: not fetched
    writer.commit()
    return ws / "train" / "round=1" / "model"


def test_multihost_handle_pickles_without_a_flow_host_path(tmp_path: Path, cache: Path) -> None:
    ws = tmp_path / "flow-workspace"
    path = committed_model(ws)
    stored = stored_model(ws, None, str(path))
    assert stored is not None and (stored.stage, stored.round, stored.key) == ("train", 1, KEY)
    journal = ws / ".requests"
    handle = EngineHandle(
        EngineConfig(kind="hf"), str(path), "f32", "cpu", str(journal), "s", stored
    )
    # the flow's own process keeps using its path; what travels names the model by key
    blob = pickle.dumps(handle)
    assert str(path).encode() not in blob and str(journal).encode() not in blob
    there = pickle.loads(blob)
    assert there.path == "" and there.stored == stored
    assert there.journal_dir is not None and Path(there.journal_dir).is_relative_to(cache)


def test_multihost_a_model_outside_the_workspace_travels_as_its_path(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    committed_model(ws)
    mine = tmp_path / "my-model"  # a directory the config names: the user's to provide
    mine.mkdir()
    assert stored_model(ws, None, str(mine)) is None
    assert stored_model(ws, None, str(ws / "train" / "round=1" / "nothing")) is None


def test_multihost_fetch_once_per_process_checked_and_reused(tmp_path: Path, cache: Path) -> None:
    ws = tmp_path / "ws"
    path = committed_model(ws)
    stored = stored_model(ws, None, str(path))
    assert stored is not None
    got = fetch(stored)
    assert got.is_relative_to(cache)
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "weights.bin"]
    assert (got / "weights.bin").read_bytes() == (path / "weights.bin").read_bytes()
    (got / "weights.bin").write_bytes(b"x")  # the process remembers: no second look
    assert fetch(stored) == got and (got / "weights.bin").read_bytes() == b"x"
    model_fetch.forget()  # a new worker process: the damaged cached copy is fetched again
    assert fetch(stored) == got and (got / "weights.bin").read_bytes() == b"w" * 4096
    model_fetch.forget()
    before = (got / "weights.bin").stat().st_mtime_ns
    assert fetch(stored) == got and (got / "weights.bin").stat().st_mtime_ns == before


def test_multihost_a_changed_object_fails_the_fetch_and_leaves_nothing(
    tmp_path: Path, cache: Path
) -> None:
    ws = tmp_path / "ws"
    path = committed_model(ws)
    stored = stored_model(ws, None, str(path))
    assert stored is not None
    (path / "weights.bin").write_bytes(b"v" * 4096)  # same size, other contents
    with pytest.raises(StaleModelError, match="sha256"):
        fetch(stored)
    assert not list((cache / "models").iterdir())  # no partial copy to reuse


def test_multihost_a_replaced_stage_fails_the_fetch_in_one_line(
    tmp_path: Path, cache: Path
) -> None:
    ws = tmp_path / "ws"
    stored = stored_model(ws, None, str(committed_model(ws)))
    assert stored is not None
    committed_model(ws, key="b" * 64)
    with pytest.raises(StaleModelError) as err:
        fetch(stored)
    assert "\n" not in str(err.value) and "no longer committed" in str(err.value)
    (ws / "train" / "round=1" / "_manifest.json").unlink()
    with pytest.raises(StaleModelError, match="no commit"):
        fetch(stored)


def test_multihost_a_local_workspace_this_host_cannot_see_is_one_line(
    tmp_path: Path, cache: Path
) -> None:
    """A worker on another host, handed a local-disk workspace without a shared file system."""
    elsewhere = StoredModel(str(tmp_path / "not-here"), "{}", "train", 1, KEY, "model")
    with pytest.raises(UserError, match=r"not on this host.*s3://") as err:
        fetch(elsewhere)
    assert "\n" not in str(err.value)


def test_multihost_an_openai_handle_keeps_the_served_name_and_journals_on_the_worker(
    tmp_path: Path, cache: Path
) -> None:
    ws = tmp_path / "flow-workspace"
    path = committed_model(ws)
    stored = stored_model(ws, None, str(path))
    cfg = EngineConfig(kind="openai", base_url="http://127.0.0.1:1/v1")
    journal = str(ws / ".requests")
    there = pickle.loads(
        pickle.dumps(EngineHandle(cfg, str(path), "f32", "cpu", journal, "t", stored))
    )
    # the server's default name for the model stays the flow's (a name, never opened there)
    assert there.cfg.served_model_name == str(path) and there.path == ""
    assert there.journal_dir is not None and Path(there.journal_dir).parent == cache / "requests"
    named = cfg.model_copy(update={"served_model_name": "student-v2"})
    again = pickle.loads(
        pickle.dumps(EngineHandle(named, str(path), "f32", "cpu", journal, "t", stored))
    )
    assert again.cfg.served_model_name == "student-v2"

"""Input files are keyed by content; the digest cache saves re-reading them and is never stale."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from data import digests
from data.digests import cache_dir, file_digest, tree_digest


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call as a new run would make it: no digest remembered in this process; and files
    written a moment ago are remembered (the two-second "racy" window is for edits by hand)."""
    monkeypatch.setattr(digests, "_MEMO", {})
    monkeypatch.setattr(digests, "RACY_NS", 0)


def new_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "_MEMO", {})


def entry(cache: Path) -> Path:
    (found,) = (cache / "digests").glob("*.json")
    return found


def test_a_cached_digest_is_used_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run reads the cache entry, not the file (a 1 GB problem file is hashed once)."""
    file, cache = tmp_path / "problems.jsonl", tmp_path / "cache"
    file.write_text('{"prompt": "1+1", "answer": "2"}\n')
    real = file_digest(file, cache)
    # mark the entry: if the next run returns the mark, it did not read the file
    marked = json.loads(entry(cache).read_text()) | {"sha256": "m" * 64}
    entry(cache).write_text(json.dumps(marked))
    new_run(monkeypatch)
    assert file_digest(file, cache) == "m" * 64
    assert real != "m" * 64


@pytest.mark.parametrize("how", ["same size, mtime put back", "another size", "replaced"])
def test_an_edited_file_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    file, cache = tmp_path / "problems.jsonl", tmp_path / "cache"
    file.write_text('{"prompt": "1+1", "answer": "2"}\n')
    before = file_digest(file, cache)
    st = file.stat()
    if how == "same size, mtime put back":  # cp -p / rsync -t over it: only ctime tells
        time.sleep(0.05)  # a clock tick later (a same-tick edit is the racy window's case)
        file.write_text('{"prompt": "1+2", "answer": "3"}\n')
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file.stat().st_mtime_ns == st.st_mtime_ns and file.stat().st_size == st.st_size
    elif how == "another size":
        file.write_text('{"prompt": "10+2", "answer": "12"}\n')
    else:  # a new file renamed over the old one (an editor's save)
        other = tmp_path / "new.jsonl"
        other.write_text('{"prompt": "1+3", "answer": "4"}\n')
        other.replace(file)
    new_run(monkeypatch)
    after = file_digest(file, cache)
    assert after != before
    assert after == file_digest(file, None)  # what hashing it afresh gives


def test_a_file_changed_a_moment_ago_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 2_000_000_000)
    file, cache = tmp_path / "problems.jsonl", tmp_path / "cache"
    file.write_text("{}\n")
    file_digest(file, cache)
    assert not (cache / "digests").exists()


def test_a_damaged_cache_entry_is_a_rehash_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file, cache = tmp_path / "a.sql", tmp_path / "cache"
    file.write_text("select 1")
    real = file_digest(file, cache)
    entry(cache).write_text('{"path": ')  # torn
    new_run(monkeypatch)
    assert file_digest(file, cache) == real


def test_a_directory_is_keyed_by_its_files_and_a_file_by_its_content(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\0" * 10)
    first = tree_digest(model)
    (model / "weights.bin").rename(model / "w.bin")  # a renamed weight file is another model
    assert tree_digest(model) != first
    a, b = tmp_path / "a.sql", tmp_path / "b.sql"
    a.write_text("select 1")
    b.write_text("select 1")
    assert tree_digest(a) == tree_digest(b)  # one file: its name is no part of its content


def test_hidden_files_of_a_model_directory_are_no_part_of_it(tmp_path: Path) -> None:
    """Two downloads of the same weights differ only in ``.cache/huggingface/`` metadata (and a
    desktop's ``.DS_Store``): the same model, the same key, no recomputation."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "tokenizer.json").write_text("{}")
    first = tree_digest(model)
    meta = model / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text(f"etag\n{time.time()}\n")
    (model / ".DS_Store").write_bytes(b"\1")
    (model / "sub" / ".config.json.swp").write_bytes(b"\2")
    assert tree_digest(model) == first
    (model / "sub" / "tokenizer.json").write_text('{"v": 2}')  # a visible file still counts
    assert tree_digest(model) != first


def test_the_cache_lives_in_mpd_cache_dir_or_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPD_CACHE_DIR", raising=False)
    assert cache_dir(tmp_path / "ws") == tmp_path / "ws" / ".mpd" / "cache"
    monkeypatch.setenv("MPD_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_dir(tmp_path / "ws") == tmp_path / "shared"

"""The train stage's examples as a memory-mapped Arrow file (train/example_file.py): the same
examples, in the same order, in the same batches as the list it replaces, and the same data
order after a kill -9 and a resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.readahead import prefetched, read_ahead
from tasks.train import build_examples, example_prompts, training_rows
from tests.conftest import REPO
from tests.test_training_rows import _naive
from train.batching import BatchPlan, collate, fit_examples, micro_batches
from train.checkpoint import latest_checkpoint
from train.config import TrainConfig
from train.example_file import (
    EXAMPLES_FILE,
    lengths_path,
    open_examples,
    stored_examples,
    write_examples,
)
from train.trainer import LaunchSpec, train
from world.config import TinyModelConfig, build_tiny_model

K = 4
SMALL = TinyModelConfig(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    from train.models import load_tokenizer

    return load_tokenizer(REPO / "world" / "assets" / "tokenizer")


def write_round(
    tmp: Path, rows: int = 60, shards: int = 3, seed: int = 0, drop_every: int | None = None
) -> dict[str, list]:
    """Targets, filter decisions and scores of a synthetic round: 1..30 target tokens, half the
    rows with a per-position k (score.mass), the others all k; about 2/3 kept (or all but
    every ``drop_every``-th: long runs of kept rows)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"targets": [], "decisions": [], "scores": []}
    for shard in range(shards):
        t, d, s = [], [], []
        for j in range(rows // shards):
            pid, idx = f"p{(shard * 7 + j * 3) % 11}", shard * 1000 + j
            n = int(rng.integers(1, 31))
            t.append({"problem_id": pid, "sample_idx": idx, "token_ids": rng.integers(0, 500, n)})
            kept = rng.random() < 0.66 if drop_every is None else j % drop_every != 1
            d.append({"problem_id": pid, "sample_idx": idx, "kept": bool(kept)})
            counts = rng.integers(1, K + 1, n) if j % 2 else None
            entries = n * K if counts is None else int(counts.sum())
            s.append(
                {
                    "problem_id": pid,
                    "sample_idx": idx,
                    "k": K,
                    "num_tokens": n,
                    "topk_ids": rng.integers(0, 500, entries).tolist(),
                    "topk_logprob_gaps": rng.integers(0, 900, entries).tolist(),
                    "topk_counts": None if counts is None else counts.tolist(),
                }
            )
        for name, table in (("targets", t), ("decisions", d), ("scores", s)):
            path = tmp / f"{name}-{shard:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(table), path)
            out[name].append(path)
    return out


PROBLEMS = {f"p{i}": {"prompt": f"question {i} " + "and more " * i} for i in range(11)}


def both(tmp: Path, tok, files: dict, template: str | None = None, batch_rows: int = 7, vocab=None):
    """The round's examples as the list the stage built before, and as the file it writes now
    (``vocab``: the vocabulary size the file's id width is chosen for; None: the tokenizer's)."""

    def rows():
        return training_rows(
            files["targets"],
            decisions=files["decisions"],
            scores=files["scores"],
            batch_rows=batch_rows,
        )

    listed = list(build_examples(rows(), PROBLEMS, tok, teacher_template=template))
    prompts = example_prompts(PROBLEMS, tok, teacher_template=template)
    prompts.vocab_size = vocab or prompts.vocab_size
    write_examples(tmp / EXAMPLES_FILE, rows(), prompts)
    ids = pa.ipc.open_file(tmp / EXAMPLES_FILE).schema.field("topk_ids").type.value_type
    assert ids == (pa.uint16() if prompts.vocab_size <= 2**16 else pa.int32())
    return listed, open_examples(tmp / EXAMPLES_FILE)


WIDTHS = [None, 2**16 + 1]  # the world's 805 ids as uint16; a vocabulary too large: int32


def same_example(a, b) -> None:
    assert a.prompt_ids == b.prompt_ids and a.target_ids == b.target_ids
    assert a.teacher_prompt_ids == b.teacher_prompt_ids
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert np.array_equal(a.topk_logprobs, b.topk_logprobs)  # +inf (not stored) included


@pytest.mark.parametrize("vocab", WIDTHS)
@pytest.mark.parametrize("template", [None, "Be concise. {problem}"])
def test_the_file_holds_the_examples_the_list_held(tmp_path: Path, tok, template, vocab) -> None:
    listed, stored = both(tmp_path, tok, write_round(tmp_path), template, vocab=vocab)
    assert 20 < len(stored) == len(listed) < 60  # the filter dropped some
    for a, b in zip(listed, stored, strict=True):
        same_example(a, b)
    assert any(np.isposinf(ex.topk_logprobs).any() for ex in stored)  # per-position k
    assert (template is None) == all(ex.teacher_prompt_ids is None for ex in stored)


@pytest.mark.parametrize("drop_every", [None, 9])  # 9: runs of 8 rows, sliced rather than taken
def test_the_join_gives_what_a_naive_join_gives(tmp_path: Path, tok, drop_every) -> None:
    files = write_round(tmp_path, rows=90, drop_every=drop_every)
    listed, stored = both(tmp_path, tok, files, batch_rows=5)
    want = _naive(files["targets"], files["decisions"], files["scores"], PROBLEMS, tok)
    assert len(want) == len(stored) == len(listed) > 30
    for ex, (prompt, target, ids, lps) in zip(stored, want, strict=True):
        assert ex.prompt_ids == prompt and ex.target_ids == list(target)
        assert np.array_equal(ex.topk_ids, ids)
        np.testing.assert_allclose(ex.topk_logprobs, lps, rtol=1e-6)


@pytest.mark.parametrize("vocab", WIDTHS)
@pytest.mark.parametrize("max_length", [1024, 24])  # 24: most targets cut, a few prompts dropped
def test_every_step_gets_the_batches_the_list_gave(tmp_path: Path, tok, max_length, vocab) -> None:
    """The trainer's order (BatchPlan over the fitted examples' lengths) and each collated
    micro-batch (every tensor, its dtype included) are the same from the file as from the
    list, over several epochs, whatever width the file stores its ids in."""
    listed, stored = both(tmp_path, tok, write_round(tmp_path, rows=90), vocab=vocab)
    kept, dropped, truncated = fit_examples(listed, max_length)
    view, v_dropped, v_truncated = stored.fit(max_length)
    assert (v_dropped, v_truncated) == (dropped, truncated)
    assert max_length == 1024 or (dropped > 0 and truncated > 0)
    assert view.lengths.tolist() == [ex.length for ex in kept]
    old, new = BatchPlan([ex.length for ex in kept], 8, seed=3), BatchPlan(view.lengths, 8, 3)
    epochs = 3 * old.per_epoch
    for step in range(epochs):
        indices = old.batch(step)
        assert new.batch(step) == indices
        for idx in micro_batches(indices, 4):
            a, b = collate([kept[i] for i in idx], 0), collate([view[i] for i in idx], 0)
            for name, tensor in vars(a).items():
                other = getattr(b, name)
                assert (tensor is None) == (other is None), name
                assert tensor is None or torch.equal(tensor, other), name
                assert tensor is None or tensor.dtype == other.dtype, name


@pytest.mark.parametrize("vocab", WIDTHS)
def test_training_from_the_file_equals_training_from_the_list(tmp_path: Path, tok, vocab) -> None:
    """train() over the file: the same losses, token counts and weights as over the list."""
    listed, stored = both(tmp_path, tok, write_round(tmp_path), vocab=vocab)
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, warmup_steps=1, max_length=40)
    runs = [
        train(build_tiny_model(tok, SMALL, seed=1), data, cfg, tokenizer=tok, seed=5)
        for data in (listed, stored)
    ]
    assert [r["tokens"] for r in runs[0].log] == [r["tokens"] for r in runs[1].log]
    assert [r["loss"] for r in runs[0].log] == [r["loss"] for r in runs[1].log]
    assert runs[0].truncated_examples == runs[1].truncated_examples > 0
    for (name, a), (_, b) in zip(
        runs[0].model.named_parameters(), runs[1].model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "change, message",
    [
        ("counts", "scores hold"),  # the counts sum to more entries than stored
        ("short", "scores cover"),  # one position fewer than the target
        ("zero", "outside 1..k"),
    ],
)
def test_bad_scores_are_named_before_training(tmp_path: Path, tok, change, message) -> None:
    files = write_round(tmp_path, rows=6, shards=1)
    table = pq.read_table(files["scores"][0]).to_pylist()
    row = table[1]  # per-position k
    if change == "counts":
        row["topk_counts"][0] += 1
    elif change == "short":
        row["topk_ids"] = row["topk_ids"][: -row["topk_counts"][-1]]
        row["topk_logprob_gaps"] = row["topk_logprob_gaps"][: len(row["topk_ids"])]
        row["topk_counts"] = row["topk_counts"][:-1]
    else:  # the same entries, one position keeping none of them
        row["topk_counts"][1] += row["topk_counts"][0]
        row["topk_counts"][0] = 0
    pq.write_table(pa.Table.from_pylist(table), files["scores"][0])
    rows = training_rows(files["targets"], scores=files["scores"])
    out = tmp_path / EXAMPLES_FILE
    with pytest.raises(ValueError, match=f"p\\d+ sample 1: .*{message}"):
        write_examples(out, rows, example_prompts(PROBLEMS, tok))
    assert not out.exists() and not lengths_path(out).exists(), "nothing half-written"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_complete_file_is_reused_and_a_broken_one_rewritten(tmp_path: Path, tok) -> None:
    files = write_round(tmp_path)
    prompts = example_prompts(PROBLEMS, tok)
    path = tmp_path / EXAMPLES_FILE
    first = stored_examples(path, training_rows(files["targets"], scores=files["scores"]), prompts)

    def never():
        raise AssertionError("the join ran again")
        yield

    again = stored_examples(path, never(), prompts)
    assert len(again) == len(first) == 60
    broken = path.read_bytes()[:1000]  # what no rename leaves, but a disk might
    path.unlink()  # a new file: the views above still map the old one (cut under them: SIGBUS)
    path.write_bytes(broken)
    rewritten = stored_examples(
        path, training_rows(files["targets"], scores=files["scores"]), prompts
    )
    for a, b in zip(first, rewritten, strict=True):
        same_example(a, b)
    lengths_path(path).unlink()  # the lengths beside it lost: the file cannot be read alone
    again = stored_examples(path, training_rows(files["targets"], scores=files["scores"]), prompts)
    assert len(again) == 60 and lengths_path(path).is_file()


@pytest.mark.parametrize("bad", [70_000, -1])
def test_an_id_a_narrow_file_cannot_hold_is_named(tmp_path: Path, tok, bad: int) -> None:
    """A vocabulary that fits uint16 but a stored top-k id that does not (a corrupt score, or
    a tokenizer that does not describe the teacher's ids): one line naming the row, nothing
    written; never an id wrapped around modulo 65,536."""
    files = write_round(tmp_path, rows=6, shards=1)
    table = pq.read_table(files["scores"][0]).to_pylist()
    table[2]["topk_ids"][3] = bad
    pq.write_table(pa.Table.from_pylist(table), files["scores"][0])
    out = tmp_path / EXAMPLES_FILE
    rows = training_rows(files["targets"], scores=files["scores"])
    with pytest.raises(ValueError, match=rf"p\d+ sample 2: topk_ids holds {bad}, outside"):
        write_examples(out, rows, example_prompts(PROBLEMS, tok))
    assert not out.exists() and not lengths_path(out).exists()


def _mapped_kb(path: Path) -> int:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_reading_the_file_keeps_no_page_of_it_mapped(tmp_path: Path, tok, monkeypatch) -> None:
    """Every example read, in the trainer's random order, over a file of many record batches:
    after each, none of the file's pages stays mapped in the process (what the trainer holds
    does not grow with the rows read), whichever batch the row was in: rows are read with
    positional reads, and a batch's header and offsets, read through the map, are unmapped with
    the kernel's fault-around on either side."""
    import train.example_batch as example_batch

    monkeypatch.setattr(example_batch, "BATCH_BYTES", 2**20)  # ~4 rows a record batch
    rng = np.random.default_rng(5)
    n, k = 2000, 32  # 256 KB of top-k a row: 64 pages
    targets, scores = [], []
    for j in range(40):
        targets.append(
            {"problem_id": f"p{j % 11}", "sample_idx": j, "token_ids": rng.integers(0, 500, n)}
        )
        scores.append({"problem_id": f"p{j % 11}", "sample_idx": j, "k": k, "num_tokens": n,
                       "topk_ids": rng.integers(0, 500, n * k), "topk_counts": None,
                       "topk_logprob_gaps": rng.integers(0, 900, n * k).astype(np.int16)})  # fmt: skip
    for name, rows in (("targets", targets), ("scores", scores)):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    files = [tmp_path / "targets.parquet"], [tmp_path / "scores.parquet"]
    rows = training_rows(files[0], scores=files[1], batch_rows=3)
    path = tmp_path / EXAMPLES_FILE
    write_examples(path, rows, example_prompts(PROBLEMS, tok))
    view = open_examples(path)
    assert pa.ipc.open_file(path).num_record_batches >= 8
    plan = BatchPlan(view.lengths, 4, seed=1)
    for i in (i for step in range(plan.per_epoch) for i in plan.batch(step)):
        ex = view[i]
        assert ex.topk_ids.shape == (n, k) and _owned(ex.topk_ids)  # a copy, not the map
        assert _mapped_kb(path) <= 64, i  # at most a fault-around of pages (the lengths are read)


def _owned(a: np.ndarray) -> bool:
    """``a`` holds memory numpy allocated (possibly through views of it), not a buffer's."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.base is None


def _with_metadata(path: Path, **changes: bytes) -> None:
    """Rewrite an examples file's lengths file with its metadata changed."""
    lengths = pa.ipc.open_file(lengths_path(path)).read_all()
    meta = {**lengths.schema.metadata, **{k.encode(): v for k, v in changes.items()}}
    with pa.ipc.new_file(lengths_path(path), lengths.schema.with_metadata(meta)) as out:
        out.write_table(lengths.replace_schema_metadata(meta))


@pytest.mark.parametrize("damage", ["other boot", "garbled, other boot", "grown", "no record"])
def test_an_unsynced_file_from_another_boot_is_written_again(tmp_path: Path, tok, damage) -> None:
    """The examples file is not fsynced: one written before a reboot (whose pages a power loss
    may have lost: here zeros under an intact footer) or not of its recorded size is written
    again, never trained on; one of this boot is reused."""
    files = write_round(tmp_path)
    prompts = example_prompts(PROBLEMS, tok)
    path = tmp_path / EXAMPLES_FILE

    def rows():
        return training_rows(files["targets"], scores=files["scores"])

    first = [(ex.target_ids, ex.topk_ids) for ex in stored_examples(path, rows(), prompts)]
    meta = pa.ipc.open_file(lengths_path(path)).schema.metadata
    assert meta[b"boot"] == Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
    data = bytearray(path.read_bytes())
    if damage.startswith("garbled"):
        data[len(data) // 3 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 3)
    if damage == "grown":
        data += b"x" * 64  # the footer read from its end no longer
    path.unlink()
    path.write_bytes(bytes(data))
    if "other boot" in damage:
        _with_metadata(path, boot=b"00000000-0000-0000-0000-000000000000")
    if damage == "no record":  # a pair written before files recorded their boot
        lengths = pa.ipc.open_file(lengths_path(path)).read_all().replace_schema_metadata(None)
        with pa.ipc.new_file(lengths_path(path), lengths.schema) as out:
            out.write_table(lengths)
    if damage == "other boot":  # a launched rank on another host opens what it was handed
        assert len(open_examples(path)) == len(first)
    joined = []

    def counted():
        for batch in rows():
            joined.append(batch.num_rows)
            yield batch

    again = stored_examples(path, counted(), prompts)
    assert sum(joined) == len(first), "the join ran again"
    for (target, ids), ex in zip(first, again, strict=True):
        assert target == ex.target_ids and np.array_equal(ids, ex.topk_ids)
    assert pa.ipc.open_file(lengths_path(path)).schema.metadata[b"boot"] == meta[b"boot"]


def test_read_ahead_keeps_order_raises_where_it_failed_and_stops_with_its_caller() -> None:
    def items(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"item {i}")
            yield i

    assert list(read_ahead(items(50), depth=3)) == list(range(50))
    got = []
    with pytest.raises(ValueError, match="item 7"):
        for i in read_ahead(items(50, fail_at=7)):
            got.append(i)
    assert got == list(range(7))
    source = items(10**6)
    ahead = read_ahead(source, depth=2)
    assert next(ahead) == 0
    ahead.close()  # the caller stops: the worker stops and closes the source
    assert source.gi_frame is None, "the source was not closed"
    assert not [t for t in threading.enumerate() if t.name == "mpd-read-ahead"]


def test_prefetched_keeps_order_bounds_what_runs_ahead_and_raises_at_its_turn() -> None:
    """data.readahead.prefetched (the join's file reads): results in the calls' order, never
    more than ``ahead`` calls started beyond the one consumed, a failure raised at its turn,
    and a caller that stops early leaves nothing running."""
    import time

    started: list[int] = []

    def call(i: int, fail: bool = False):
        def run() -> int:
            started.append(i)
            time.sleep(0.01 * ((7 * i) % 3))  # finishing out of order
            if fail:
                raise ValueError(f"call {i}")
            return i

        return run

    def calls(n: int, fail_at: int | None = None):
        for i in range(n):
            yield call(i, i == fail_at)

    got = []
    for i in prefetched(calls(20), ahead=3):
        assert max(started) <= i + 3, (i, started)
        got.append(i)
    assert got == list(range(20))
    started.clear()
    with pytest.raises(ValueError, match="call 5"):
        list(prefetched(calls(20, fail_at=5), ahead=2))
    assert max(started) <= 7
    started.clear()
    stream = prefetched(calls(10**6), ahead=2)
    assert next(stream) == 0
    stream.close()
    assert len(started) <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("mpd-prefetch")]


def test_kill_9_mid_train_resumes_the_same_data_order(tmp_path: Path, tok) -> None:
    """A launched run over an examples file, killed with SIGKILL while it trains step 7 (its last
    checkpoint: step 6), then run again: every micro-batch after the resume is the one an
    uninterrupted run collates at that step, and so is every loss."""
    files = write_round(tmp_path, rows=90)
    data = tmp_path / EXAMPLES_FILE
    write_examples(
        data,
        training_rows(files["targets"], decisions=files["decisions"], scores=files["scores"]),
        example_prompts(PROBLEMS, tok),
    )
    model_dir = tmp_path / "student"
    build_tiny_model(tok, SMALL, seed=0).save_pretrained(model_dir)
    cfg = TrainConfig(
        steps=12, batch_size=2, grad_accum=2, warmup_steps=1, checkpoint_every=3, max_length=40
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(name: str, hold_at: int | None = None) -> tuple[subprocess.Popen, Path, Path]:
        out, digests = tmp_path / name, tmp_path / f"{name}.digests"
        spec = LaunchSpec(
            model=str(model_dir), examples=str(data), out_dir=str(out), config=cfg,
            tokenizer=str(REPO / "world" / "assets" / "tokenizer"), threads=1, cpu=True, seed=7,
        )  # fmt: skip
        (tmp_path / f"{name}.json").write_text(spec.model_dump_json())
        cmd = [sys.executable, "-m", "tests.order_child", str(tmp_path / f"{name}.json")]
        cmd += [str(digests)] + ([str(hold_at)] if hold_at else [])
        return subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE), out, digests

    def lines(path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    proc, out, digests = launch("killed", hold_at=2 * 7)  # 2 micro-batches a step
    deadline = time.monotonic() + 180
    while len(lines(digests)) < 14:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out).name == "step-000006" and not (out / "model").exists()
    before = lines(digests)
    resumed, _, _ = launch("killed")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    straight, straight_out, straight_digests = launch("straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]
    want = lines(straight_digests)
    assert len(want) == 24 and len(set(want)) > 12
    assert before == want[:14]
    assert lines(digests)[14:] == want[12:], "after the resume: steps 7..12, in order"
    got_log = json.loads((out / "log.json").read_text())
    want_log = json.loads((straight_out / "log.json").read_text())
    assert [r["step"] for r in got_log] == list(range(1, 13))
    assert [(r["tokens"], r["loss"]) for r in got_log] == [
        (r["tokens"], r["loss"]) for r in want_log
    ]

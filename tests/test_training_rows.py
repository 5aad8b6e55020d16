"""The train stage's data, joined in DuckDB (tasks/train.py training_rows + build_examples),
against a naive Python join of the same Parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import LOGPROB_SCALE, logprob_gaps
from tasks.train import build_examples, training_rows
from tests.conftest import REPO

K = 3


@pytest.fixture(scope="module")
def tok():
    from train.models import load_tokenizer

    return load_tokenizer(REPO / "world" / "assets" / "tokenizer")


def _write(tmp: Path, rng: np.random.Generator) -> tuple[list[Path], list[Path], list[Path]]:
    targets, decisions, scores = [], [], []
    for shard in range(3):
        rows, dec, sc = [], [], []
        for j in range(5):
            pid, idx = f"p{(shard * 7 + j * 3) % 11}", shard * 10 + j  # not sorted by key
            n = int(rng.integers(1, 9))
            rows.append(
                {
                    "problem_id": pid,
                    "sample_idx": idx,
                    "token_ids": rng.integers(0, 500, n).tolist(),
                }
            )
            dec.append({"problem_id": pid, "sample_idx": idx, "kept": bool(rng.random() < 0.6)})
            row = {
                "problem_id": pid,
                "sample_idx": idx,
                "k": K,
                "num_tokens": n,
                "topk_ids": rng.integers(0, 500, n * K).tolist(),
                "topk_logprob_gaps": logprob_gaps(rng.integers(-32000, 0, (n, K)).astype(np.int16))
                .reshape(-1)
                .tolist(),
            }
            # shard 0: written before topk_counts existed; 1: a per-position k (score.mass),
            # except its first row; 2: all k, counts null
            if shard == 1:
                counts = rng.integers(1, K + 1, n).tolist() if j else None
                if counts is not None:
                    row["topk_ids"] = rng.integers(0, 500, sum(counts)).tolist()
                    row["topk_logprob_gaps"] = rng.integers(0, 900, sum(counts)).tolist()
                row["topk_counts"] = counts
            elif shard == 2:
                row["topk_counts"] = None
            sc.append(row)
        for name, table, out in (("t", rows, targets), ("d", dec, decisions), ("s", sc, scores)):
            path = tmp / f"{name}-{shard:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(table), path)
            out.append(path)
    scores.reverse()  # the scores' file order must not matter
    return targets, decisions, scores


def _naive(targets, decisions, scores, problems, tok):
    from tasks.generation import chat_prompt

    kept = {
        (d["problem_id"], d["sample_idx"])
        for f in decisions
        for d in pq.read_table(f).to_pylist()
        if d["kept"]
    }
    by_key = {
        (s["problem_id"], s["sample_idx"]): s for f in scores for s in pq.read_table(f).to_pylist()
    }
    out = []
    for f in targets:
        for t in pq.read_table(f).to_pylist():
            if (t["problem_id"], t["sample_idx"]) not in kept:
                continue
            s = by_key[(t["problem_id"], t["sample_idx"])]
            k, counts = s["k"], s.get("topk_counts") or [s["k"]] * s["num_tokens"]
            ids = np.zeros((s["num_tokens"], k), np.int64)
            lps = np.full((s["num_tokens"], k), np.inf, np.float32)
            start = 0
            for pos, c in enumerate(counts):  # each position's kept candidates, one after another
                ids[pos, :c] = s["topk_ids"][start : start + c]
                gaps = np.asarray(s["topk_logprob_gaps"][start : start + c])
                lps[pos, :c] = -np.cumsum(gaps) * np.float32(LOGPROB_SCALE)
                start += c
            prompt = chat_prompt(tok, problems[t["problem_id"]]["prompt"])
            out.append((prompt, t["token_ids"], ids, lps))
    return out  # fmt: skip


@pytest.mark.parametrize("batch_rows", [1, 4, 2048])
def test_join_matches_a_naive_python_join(tmp_path: Path, batch_rows: int, tok) -> None:
    targets, decisions, scores = _write(tmp_path, np.random.default_rng(0))
    problems = {f"p{i}": {"prompt": f"question {i}?"} for i in range(11)}
    got = list(
        build_examples(
            training_rows(targets, decisions=decisions, scores=scores, batch_rows=batch_rows),
            problems,
            tok,
        )
    )
    want = _naive(targets, decisions, scores, problems, tok)
    assert 0 < len(got) == len(want) < 15  # the filter dropped some, in the targets' order
    for ex, (prompt, target, ids, lps) in zip(got, want, strict=True):
        assert ex.prompt_ids == prompt and ex.target_ids == target
        assert np.array_equal(ex.topk_ids, ids)
        np.testing.assert_allclose(ex.topk_logprobs, lps, rtol=1e-6)  # +inf: not stored
    assert any(np.isposinf(ex.topk_logprobs).any() for ex in got)  # per-position k decoded


def test_without_filter_or_scores_every_target_in_order(tmp_path: Path) -> None:
    targets, _, _ = _write(tmp_path, np.random.default_rng(1))
    rows = pa.Table.from_batches(list(training_rows(targets)))
    want = pa.concat_tables([pq.read_table(f) for f in targets])
    assert rows.column("sample_idx").to_pylist() == want.column("sample_idx").to_pylist()
    assert rows.column("token_ids").to_pylist() == want.column("token_ids").to_pylist()


def test_a_kept_target_without_a_score_is_an_error(tmp_path: Path, tok) -> None:
    targets, _, scores = _write(tmp_path, np.random.default_rng(2))
    problems = {f"p{i}": {"prompt": "q"} for i in range(11)}
    rows = training_rows(targets, decisions=None, scores=scores[:1])
    with pytest.raises(ValueError, match="no score"):
        list(build_examples(rows, problems, tok))

"""Schemas are checked on write: wrong columns, types and nulls are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data.schemas import (
    DECISIONS,
    PRODUCT_K,
    TRACE_FIELDS,
    SchemaError,
    conform,
    decode_topk,
    dequantize_logprobs,
    encode_topk,
    encode_topk_logprobs,
    kept_counts,
    logprob_gaps,
    logprobs_from_gaps,
    quantize_logprobs,
)
from data.store import StageStore
from data.tables import tables
from tests.test_store import decisions

TABLES = {name: t.schema for name, t in tables().items()}


def test_every_trace_table_has_the_columns_the_system_relies_on() -> None:
    needed = {
        "round",
        "problem_id",
        "sample_idx",
        "completion",
        "token_ids",
        "think_tokens",
        "answer_tokens",
        "total_tokens",
        "finish_reason",
        "truncated",
        "correct",
    }
    for name in ("samples", "rewrites", "evals"):
        assert needed <= set(TABLES[name].names), name
    assert all("round" in schema.names for schema in TABLES.values())
    assert {"kept", "reason"} <= set(TABLES["decisions"].names)
    assert [f.name for f in TRACE_FIELDS][:3] == ["round", "problem_id", "sample_idx"]


def test_safe_casts_are_applied() -> None:
    table = decisions(1, 0, 3)  # Python ints arrive as int64
    out = conform(table, DECISIONS)
    assert out.schema == DECISIONS


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["reason"]), "missing column(s) reason"),
        (lambda t: t.append_column("extra", pa.array([1, 2, 3])), "unexpected column(s) extra"),
        (
            lambda t: t.set_column(3, "kept", pa.array(["yes", "no", "x"])),
            "column 'kept' is string, expected bool",
        ),
        (
            lambda t: t.set_column(1, "problem_id", pa.array(["a", None, "c"])),
            "column 'problem_id' has 1 null value(s)",
        ),
        (
            lambda t: t.set_column(0, "round", pa.array([1, 2**40, 3])),
            "column 'round' is int64, expected int32",
        ),
    ],
)
def test_violations_are_refused(mutate, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        conform(mutate(decisions(1, 0, 3)), DECISIONS, name="decisions")
    assert message in str(err.value)


def test_store_refuses_a_bad_shard_and_writes_nothing(tmp_path: Path) -> None:
    w = StageStore(tmp_path).writer("filter", 1, "s" * 64)
    with pytest.raises(SchemaError):
        w.write_shard(0, decisions(1, 0, 3).drop_columns(["ratio"]), DECISIONS)
    assert w.done_shards() == set()
    assert not list(w.dir.glob("*.parquet"))


@pytest.mark.parametrize("sort", [True, False])
def test_logprob_gaps_are_lossless(sort: bool) -> None:
    """The stored rank-order gaps decode to exactly the quantised logprobs (in rank order or
    not, extremes included): the trainer sees what it saw before the gaps."""
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.full(64, 0.1), size=50)).astype(np.float32)[:, :32]
    if sort:
        lp = -np.sort(-lp, axis=1)
    lp[0, 0], lp[1, -1], lp[2] = 0.0, -40.0, -32.0  # 0, below the clip, all at the clip
    stored = encode_topk_logprobs(lp)
    assert stored.dtype == np.int16 and stored.shape == lp.shape
    np.testing.assert_array_equal(
        logprobs_from_gaps(stored.reshape(-1), 32), dequantize_logprobs(quantize_logprobs(lp))
    )
    if sort:
        assert (stored >= 0).all(), "rank order gives non-negative gaps"


@pytest.mark.parametrize("k", [1, 32, 64, 512])
def test_logprobs_from_gaps_equals_its_integer_reference_bit_for_bit(k: int) -> None:
    """The decode summed in int32 gives exactly what the int64 sum did, for any int16 gaps (not
    only those an encoder writes: corrupt or adversarial ones too, the extremes included)."""
    rng = np.random.default_rng(k)
    gaps = rng.integers(-(2**15), 2**15, size=(40, k)).astype(np.int16)
    gaps[0] = 2**15 - 1
    gaps[1] = -(2**15)
    gaps[2, :] = rng.integers(0, 2000, size=k)
    want = (np.cumsum(gaps.astype(np.int64), axis=1) * -1).astype(np.float32) * np.float32(1e-3)
    got = logprobs_from_gaps(gaps.reshape(-1), k)
    assert got.dtype == np.float32 and got.shape == (40, k)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_logprobs_from_gaps_is_exact_where_its_running_sum_wraps() -> None:
    """2,048 positions x top-128 of the largest gap (past PRODUCT_K: the running sum): the int32
    running sum over the row passes 2**31 (8.6e9), each position's own sum does not; the
    decode equals the int64 sum."""
    k = 128
    assert k > PRODUCT_K
    gaps = np.full((2048, k), 2**15 - 1, np.int16)
    gaps[::7] = -(2**15)
    want = (np.cumsum(gaps.astype(np.int64), axis=1) * -1).astype(np.float32) * np.float32(1e-3)
    assert np.abs(np.cumsum(gaps.astype(np.int64))).max() > 2**31
    got = logprobs_from_gaps(gaps.reshape(-1), k)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_logprobs_from_gaps_by_product_is_exact_at_its_largest_sums(dtype: type) -> None:
    """At PRODUCT_K, the float32 product's largest sums (k x the largest 16-bit gap, of either
    sign) and a zero (+0.0, as the integer decode gives) equal numpy's int64 sum, bit for bit;
    many positions (several of the product's row blocks) included."""
    k, info = PRODUCT_K, np.iinfo(dtype)
    rng = np.random.default_rng(1)
    gaps = rng.integers(info.min, int(info.max) + 1, size=(3000, k)).astype(dtype)
    gaps[0], gaps[1], gaps[2] = info.max, info.min, 0
    want = (np.cumsum(gaps.astype(np.int64), axis=1) * -1).astype(np.float32) * np.float32(1e-3)
    got = logprobs_from_gaps(gaps.reshape(-1), k)
    assert got.shape == (3000, k) and not np.signbit(got[2]).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_logprob_gaps_naive_reference() -> None:
    q = np.array([[-5, -2000, -2001], [0, -32000, -100]], np.int16)
    want = [[5 - 0, -5 - -2000, -2000 - -2001], [0, 32000, -32000 - -100]]
    assert logprob_gaps(q).tolist() == want


@pytest.mark.parametrize("mass", [0.5, 0.9, 0.999, 1.0])
def test_per_position_k_against_a_naive_reference(mass: float) -> None:
    """score.mass: each position keeps its fewest leading candidates whose probability reaches
    the mass (all k if they never do); decoding gives the kept (id, quantised logprob) pairs in
    place and +inf (not stored) for the rest. mass = 1 stores the fixed layout, counts null."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(200, 0.01), size=40)
    probs[0] = 1 / 200  # flat: 32 candidates never reach the mass, all are kept
    ids = np.argsort(-probs, axis=1)[:, :32]
    lp = np.log(np.take_along_axis(probs, ids, axis=1)).astype(np.float32)
    want_counts = []
    for row in lp:  # naive: add probabilities until the mass is reached
        total, count = 0.0, 32
        for j, value in enumerate(row):
            total += float(np.exp(np.float64(value)))
            if mass < 1 and total >= mass:  # mass 1 keeps all k, whatever rounding sums to
                count = j + 1
                break
        want_counts.append(count)
    assert kept_counts(lp, mass).tolist() == want_counts
    flat_ids, gaps, counts = encode_topk(ids, lp, mass)
    if mass == 1.0:
        assert counts is None and flat_ids.tolist() == ids.reshape(-1).tolist()
    else:
        assert counts.tolist() == want_counts and len(flat_ids) == len(gaps) == sum(want_counts)
        assert min(want_counts) < 32  # the mass cut something
    got_ids, got_lp = decode_topk(flat_ids, gaps, 32, counts)
    quantised = dequantize_logprobs(quantize_logprobs(lp))
    for t, c in enumerate(want_counts):
        assert got_ids[t, :c].tolist() == ids[t, :c].tolist()
        assert got_lp[t, :c].tolist() == quantised[t, :c].tolist()
        assert np.isposinf(got_lp[t, c:]).all()


def test_per_position_k_refuses_counts_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="counts sum"):
        decode_topk([1, 2, 3], [0, 5, 5], 2, [2, 2])
    with pytest.raises(ValueError, match=r"1\.\.k"):
        decode_topk([1, 2, 3], [0, 5, 5], 2, [3, 0])

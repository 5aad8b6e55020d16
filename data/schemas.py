"""One pyarrow schema per table, checked on every write.

Every table carries ``round`` as a real column (not only as a hive partition in
the path), so a single Parquet file is self-describing when copied out of the
workspace, and the DuckDB views can read with ``hive_partitioning=false`` and
never disagree with the file about which round a row belongs to.

A sample record (table ``samples``)::

    {"round": 1, "problem_id": "arith-train-000017", "sample_idx": 0,
     "completion": "<think>\\n3 + 4 = 7 ...\\n</think>\\n\\nAnswer: 7",
     "token_ids": [5, 71, ...], "prompt_tokens": 23, "think_tokens": 41,
     "answer_tokens": 4, "total_tokens": 46, "finish_reason": "stop",
     "truncated": False, "correct": True, "pred_answer": "7", "model": "..."}
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa

from data.errors import InternalError

# Columns shared by every table that holds generated traces (samples, rewrites,
# evals). The rest of the system relies on these names.
TRACE_FIELDS: list[pa.Field] = [
    pa.field("round", pa.int32(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("think_tokens", pa.int32(), nullable=False),
    pa.field("answer_tokens", pa.int32(), nullable=False),
    pa.field("total_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length"
    pa.field("truncated", pa.bool_(), nullable=False),
    pa.field("correct", pa.bool_(), nullable=False),
    pa.field("pred_answer", pa.string()),  # None when no answer could be extracted
    pa.field("model", pa.string(), nullable=False),  # identity of the generating model
]

PROBLEMS = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "test" | "heldout" | "dev"
        pa.field("difficulty", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the question, not chat-formatted
        pa.field("answer", pa.string(), nullable=False),  # gold answer, canonical text
        pa.field("source", pa.string(), nullable=False),  # "builtin" or the user's file
    ]
)

SAMPLES = pa.schema(TRACE_FIELDS)

# The teacher's own solutions to the round's problems (method off_policy's targets).
SOLUTIONS = pa.schema(TRACE_FIELDS)

REWRITES = pa.schema(
    [
        *TRACE_FIELDS,
        # The student sample this rewrite was made from, denormalised so the
        # filter and users' SQL need no join for the common questions.
        pa.field("orig_think_tokens", pa.int32(), nullable=False),
        pa.field("orig_total_tokens", pa.int32(), nullable=False),
        pa.field("orig_correct", pa.bool_(), nullable=False),
        pa.field("orig_truncated", pa.bool_(), nullable=False),
    ]
)

# Method truncation's targets: the student's sample cut to the think length of its kept
# rewrite, closed with </think> and the rewrite's answer (columns as rewrites; orig_* describe
# the student's sample).
TRUNCATIONS = REWRITES

# Teacher top-k per target token, flattened row-major: entry t*k + j is the j-th
# candidate at target position t. Logprobs are quantised to int16 in units of
# LOGPROB_SCALE nats (clipped at LOGPROB_MIN): 2 bytes instead of 4, resolution
# 0.001 nats, which is far below what training can resolve. They are stored as
# rank-order gaps (topk_logprob_gaps): per position, entry 0 is -q[0] and entry j
# is q[j-1] - q[j], small non-negative numbers for candidates in rank order, which
# zstd packs tighter than the values themselves (measured at k = 32, ids + logprobs:
# 60 -> 52 bytes per target token on the world's default 64-trace shards, 86 -> 72 on
# 32 traces, 118 -> 100 on SmolLM2's 49,152-token vocabulary; benchmarks/bench_scores.py).
# Lossless: decoding gives the same int16.
# With score.mass < 1 a position keeps only its leading candidates whose probability reaches
# that mass (topk_counts records how many): the rest join the losses' tail bucket. SmolLM2's
# 64 traces at mass 0.999: 102 -> 79 bytes per target token, the per-token loss moved no more
# than int16 quantisation moves it (docs/floors.md).
LOGPROB_SCALE = 1e-3
LOGPROB_MIN = -32.0


def quantize_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """Logprobs (nats) -> the scores table's int16, in units of LOGPROB_SCALE, clipped at
    LOGPROB_MIN. The one encoder; :func:`dequantize_logprobs` is its one decoder."""
    clipped = np.clip(logprobs, LOGPROB_MIN, 0.0)
    return np.round(clipped / LOGPROB_SCALE).astype(np.int16)


def dequantize_logprobs(quantised: np.ndarray | list[int]) -> np.ndarray:
    """int16 logprobs in units of LOGPROB_SCALE -> float32 nats (one new array, scaled in place)."""
    return _in_nats(np.array(quantised, dtype=np.float32))


def _in_nats(units: np.ndarray) -> np.ndarray:
    """float32 logprobs in units of LOGPROB_SCALE, scaled to nats in place."""
    units *= np.float32(LOGPROB_SCALE)
    return units


def logprob_gaps(quantised: np.ndarray) -> np.ndarray:
    """[T, k] int16 logprobs -> the stored rank-order gaps [T, k] int16 (see SCORES).

    Every gap fits int16 whatever the order (values lie in [-32000, 0]), so an engine that
    returns candidates out of rank order costs compression, never correctness.
    """
    q = np.asarray(quantised, dtype=np.int32)
    gaps = np.empty_like(q)
    gaps[..., 0] = -q[..., 0]
    gaps[..., 1:] = q[..., :-1] - q[..., 1:]
    return gaps.astype(np.int16)


def logprobs_from_gaps(gaps: np.ndarray | list[int], k: int) -> np.ndarray:
    """The stored gaps (flat t*k + j, or [T, k]) -> [T, k] float32 nats: the one decoder."""
    g = np.asarray(gaps)
    if g.dtype.kind not in "iu":
        g = g.astype(np.int32)
    if k >= 2**16:  # a partial sum may pass int32: numpy's int64 sum
        sums = np.cumsum(g.reshape(-1, k), axis=1)
        return dequantize_logprobs(np.negative(sums, out=sums))
    if k <= PRODUCT_K and g.dtype.itemsize <= 2:
        return _in_nats(_negated_sums_by_product(g.reshape(-1, k)))
    # One running sum over all T x k gaps in int32 (a contiguous loop), then each position's
    # total before it taken off: exact although the running sum wraps past 2**31 on long rows,
    # because int32 arithmetic is modulo 2**32 and a position's own partial sums (at most
    # k x 32,768) fit. Negated by that subtraction (in int32, written out as float32: no third
    # pass), so a zero stays +0.0. tests/test_schemas.py holds it to numpy's int64 sum, bit for bit.
    sums = np.empty(g.size, np.int32)
    np.add.accumulate(g.reshape(-1), dtype=np.int32, out=sums)
    sums = sums.reshape(-1, k)
    before = np.zeros((len(sums), 1), np.int32)
    before[1:, 0] = sums[:-1, -1]
    units = np.empty(sums.shape, np.float32)
    np.subtract(before, sums, out=units, dtype=np.int32, casting="unsafe")
    return _in_nats(units)


# Up to this k the trainer's decode (every example it reads, every epoch) is a product with a
# triangular matrix of ones. numpy's accumulate carries its running sum through memory: 2.7 ns
# a gap on this project's 2-core machines, 117 us to decode an example of 1,024 x top-32, most
# of the trainer's read; by the product, 34 us (the read of 5,000 such examples: 0.86-0.98 s ->
# 0.44-0.47 s). The product costs k multiply-adds a value: at k = 64 still 221 against 324 us,
# at 96 it loses (574 against 478).
PRODUCT_K = 64


@cache
def _upper_ones(k: int) -> np.ndarray:
    """[k, k] float32, ones on and above the diagonal (read-only: one per k, shared)."""
    upper = np.triu(np.ones((k, k), np.float32))
    upper.setflags(write=False)
    return upper


def _negated_sums_by_product(rows: np.ndarray) -> np.ndarray:
    """[T, k] gaps of at most 16 bits -> [T, k] float32: minus each row's running sum, exactly.

    Each sum is a float32 matrix product (``rows @ U``, U upper-triangular ones): every
    product is a gap times 1 or 0 and every partial sum an integer of at most k x 65,535 <
    2**24, all exact in float32 whatever order the BLAS adds them in, so the result is the
    integer sum's, bit for bit (tests/test_schemas.py). Then 0 - sum, so a zero is +0.0 as the
    integer decode's is. Multiplied a few hundred rows at a time: OpenBLAS runs a product of
    up to 2**18 multiply-adds on the calling thread (on two threads one example's product took
    half as long again, 55 against 37 us, and they would spin beside the trainer's own)."""
    k = rows.shape[1]
    upper = _upper_ones(k)
    gaps = rows.astype(np.float32)
    out = np.empty_like(gaps)
    step = max(1, 2**18 // (k * k))
    for a in range(0, len(out), step):
        np.matmul(gaps[a : a + step], upper, out=out[a : a + step])
    return np.subtract(np.float32(0), out, out=out)


def encode_topk_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """[T, k] float logprobs (nats) -> the stored gaps: quantise, then rank-order gaps."""
    return logprob_gaps(quantize_logprobs(logprobs))


def kept_counts(logprobs: np.ndarray, mass: float) -> np.ndarray:
    """[T, k] logprobs -> [T] candidates to keep per position: the fewest leading ones whose
    probability reaches ``mass`` (all k when it never does; ``mass >= 1`` keeps all k).

    A prefix in the engine's order (rank order from every engine here): the loss accepts any
    subset of candidates, so an out-of-order engine costs bytes, never correctness.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    t, k = lp.shape
    if mass >= 1.0:
        return np.full(t, k, dtype=np.int64)
    reached = np.cumsum(np.exp(lp), axis=1) >= mass
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, k)


def encode_topk(
    ids: np.ndarray, logprobs: np.ndarray, mass: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[T, k] ids and float logprobs -> the scores row's flat ``topk_ids``, ``topk_logprob_gaps``
    and ``topk_counts`` (None when every position keeps all k): per position, the leading
    candidates :func:`kept_counts` keeps, positions one after another."""
    ids = np.asarray(ids)
    gaps = encode_topk_logprobs(logprobs)
    counts = kept_counts(logprobs, mass)
    if (counts == ids.shape[1]).all():
        return ids.reshape(-1), gaps.reshape(-1), None
    kept = np.arange(ids.shape[1])[None, :] < counts[:, None]
    return ids[kept], gaps[kept], counts


def decode_topk(
    topk_ids: np.ndarray | list[int],
    topk_logprob_gaps: np.ndarray | list[int],
    k: int,
    counts: np.ndarray | list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One scores row -> ([T, k] ids, [T, k] float32 logprobs): the one decoder.

    The ids keep an integer array's type (the examples file's uint16, the table's int32: the
    trainer's collate widens them into its batch tensor, one copy, not two); anything else
    becomes int64.

    A candidate a position did not keep (``counts``) has id 0 and logprob +inf, which no real
    logprob is ("not stored"; NaN stays a broken value the trainer skips, −inf a candidate of
    zero probability): the top-k losses leave it out of both sides' buckets, its mass in the
    tail bucket.
    """
    ids = np.asarray(topk_ids)
    if ids.dtype.kind not in "iu":
        ids = ids.astype(np.int64)
    gaps = np.asarray(topk_logprob_gaps)
    if counts is None:
        if len(ids) % k or len(gaps) != len(ids):
            raise ValueError(f"scores hold {len(ids)} ids and {len(gaps)} logprobs, not T x k={k}")
        return ids.reshape(-1, k), logprobs_from_gaps(gaps, k)
    counts = np.asarray(counts, dtype=np.int64)
    if len(ids) != counts.sum() or len(gaps) != len(ids) or ((counts < 1) | (counts > k)).any():
        raise ValueError(
            f"scores hold {len(ids)} ids and {len(gaps)} logprobs; their counts sum to "
            f"{counts.sum()} (each must be 1..k={k})"
        )
    kept = np.arange(k)[None, :] < counts[:, None]
    full_ids = np.zeros((len(counts), k), dtype=ids.dtype)
    full_gaps = np.zeros((len(counts), k), dtype=np.result_type(gaps.dtype, np.int16))
    full_ids[kept], full_gaps[kept] = ids, gaps
    logprobs = logprobs_from_gaps(full_gaps, k)
    logprobs[~kept] = np.inf
    return full_ids, logprobs


SCORES = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprob_gaps", pa.list_(pa.int16()), nullable=False),
        # candidates kept at each target position (score.mass < 1): position t's entries follow
        # positions 0..t-1's; null when every position keeps all k (then entry t*k + j)
        pa.field("topk_counts", pa.list_(pa.int16())),
        pa.field("context", pa.string(), nullable=False),  # "problem" | "rewrite" | "concise"
        pa.field("model", pa.string(), nullable=False),
    ]
)

DECISIONS = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        # "kept" | "wrong" | "truncated" | "no_answer" | "unfaithful" | "not_shorter" | "duplicate"
        pa.field("reason", pa.string(), nullable=False),
        pa.field("think_tokens", pa.int32(), nullable=False),
        pa.field("orig_think_tokens", pa.int32(), nullable=False),
        pa.field("ratio", pa.float64()),  # think_tokens / orig_think_tokens
    ]
)

TRAIN_LOG = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("grad_norm", pa.float64()),
        pa.field("lr", pa.float64(), nullable=False),
        pa.field("skipped", pa.bool_(), nullable=False),
        pa.field("elapsed_s", pa.float64(), nullable=False),
    ]
)

EVALS = pa.schema(
    [
        *TRACE_FIELDS,
        pa.field("split", pa.string(), nullable=False),  # "test" | "heldout" | "dev"
        pa.field("family", pa.string(), nullable=False),
    ]
)

# The bootstrap's evaluation of the built-in student and teacher (round 0 only):
# role "student" solves the eval problems from the plain prompt, "student_cued"
# from the problem inside the concise cue (data/prompts.py), "teacher" solves
# directly; role "rewrite" is the teacher rewriting the student's plain trace
# (orig_* describe that trace). style: the completion's style, world.style_of.
BOOTSTRAP_EVALS = pa.schema(
    [
        *EVALS,
        pa.field("role", pa.string(), nullable=False),
        pa.field("style", pa.string(), nullable=False),
        pa.field("orig_think_tokens", pa.int32()),
        pa.field("orig_correct", pa.bool_()),
    ]
)


class SchemaError(InternalError):
    """A table about to be written does not match its declared schema: our bug (a stage built
    the wrong columns), unless the table came from the user (the filter's output: the caller
    says so with its own error)."""


def conform(table: pa.Table, schema: pa.Schema, *, name: str = "table") -> pa.Table:
    """Return ``table`` cast to ``schema`` or raise :class:`SchemaError`.

    Missing or unexpected columns are errors (a typo in a column name must not
    silently produce a NULL column); safe casts (int64 -> int32 when values fit,
    large_string -> string) are applied so producers can build tables from
    plain Python lists. Nulls in non-nullable columns are errors.
    """
    have, want = set(table.column_names), set(schema.names)
    if missing := sorted(want - have):
        raise SchemaError(f"{name}: missing column(s) {', '.join(missing)}")
    if extra := sorted(have - want):
        raise SchemaError(f"{name}: unexpected column(s) {', '.join(extra)}")
    table = table.select(schema.names)
    columns = []
    for field in schema:
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            raise SchemaError(f"{name}: column {field.name!r} has {col.null_count} null value(s)")
        try:
            columns.append(col.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(
                f"{name}: column {field.name!r} is {col.type}, expected {field.type} ({exc})"
            ) from None
    return pa.Table.from_arrays(columns, schema=schema)

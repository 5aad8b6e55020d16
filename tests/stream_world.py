"""A round's workspace for the streamed stages' tests and memory benchmark.

- :func:`context`: a campaign context over the shipped tiny models, as ``mpd run`` builds one,
  and :func:`new_round`: round 1 with the stages already committed in its workspace.
- :func:`write_round`: committed problems, samples, rewrites and filter decisions of a round of
  ``rows`` traces at realistic widths (~1.4 KB of text and 350 token ids each, the shapes of
  ``benchmarks/bench_filter.py``), written shard by shard as the stages write them.
- :class:`StandInEngine`: not a model. Where the data path's memory is measured over thousands
  of traces, a model's inference would take all the time; it answers and scores instantly.

As a script (the process a test kills with SIGKILL)::

    python -m tests.stream_world WORKSPACE SHARD_ROWS

it runs the truncate stage of the round in WORKSPACE with shards of SHARD_ROWS kept rewrites.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data.schemas import DECISIONS, PROBLEMS, REWRITES, SAMPLES
from data.store import StageStore
from engines.base import Completion, GenerationParams, TokenScores
from flows.config import RunConfig
from tasks.common import StageResult
from tasks.context import Context, Recipe, Round
from tests.conftest import REPO

STUDENT = REPO / "world" / "assets" / "student"
TEACHER = REPO / "world" / "assets" / "teacher"
TEXT_BYTES, TOKENS, SAMPLES_PER_PROBLEM = 1400, 350, 4


def context(ws: Path, **sections: Any) -> Context:
    """A campaign over the tiny models in ``ws`` (its problems committed), on the CPU."""
    models = {"student": str(STUDENT), "teacher": str(TEACHER), "device": "cpu"}
    cfg = RunConfig.model_validate({"workspace": ws, "models": models, **sections})
    man = StageStore(ws).manifest("problems", 0)
    assert man is not None, "commit the problems first"
    ctx = Context(cfg)
    path = str(ctx.store.stage_dir("problems", 0))  # committed: what the campaign's setup finds
    ctx.setup.done["problems"] = StageResult("problems", 0, man.key, man.rows, True, 0.0, path)
    return ctx


def commit(store: StageStore, stage: str, round_: int, key: str, shards: list[pa.Table]) -> None:
    """Commit a stage run of the given shards (what a stage body would have written)."""
    schema = {"problems": PROBLEMS, "sample": SAMPLES, "rewrite": REWRITES, "filter": DECISIONS}
    writer = store.writer(stage, round_, key)
    for i, shard in enumerate(shards):
        writer.write_shard(i, shard, schema[stage])
    writer.commit(expected_shards=len(shards))


def commit_problems(store: StageStore, records: list[dict]) -> None:
    rows = [{"round": 0, **r, "source": "builtin"} for r in records]
    commit(store, "problems", 0, "p" * 64, [pa.Table.from_pylist(rows, PROBLEMS)])


def new_round(ctx: Context, targets: str = "rewrite") -> Round:
    """Round 1 of ``ctx``, with every stage committed in its workspace marked done."""
    rnd = Round(r=1, student=ctx.starting_student(), recipe=Recipe(targets=targets))
    for man in ctx.store.committed():
        if man.round != 1:
            continue
        path = str(ctx.store.stage_dir(man.stage, man.round))
        rnd.done[man.stage] = StageResult(man.stage, 1, man.key, man.rows, True, 0.0, path)
    return rnd


def write_round(ws: Path, rows: int, *, shard_rows: int = 256, vocab: int = 800) -> None:
    """Problems, ``rows`` samples and their rewrites, and decisions keeping every other one."""
    store = StageStore(ws)
    n_problems = -(-rows // SAMPLES_PER_PROBLEM)
    problems = [
        {"problem_id": f"arith-train-{p:06d}", "family": "arith", "split": "train",
         "difficulty": 1, "prompt": f"What is {p} + 7?", "answer": str(p + 7)}
        for p in range(n_problems)
    ]  # fmt: skip
    commit_problems(store, problems)
    rng = np.random.default_rng(0)
    parts: dict[str, list[pa.Table]] = {"sample": [], "rewrite": [], "filter": []}
    for lo in range(0, rows, shard_rows):
        n = min(shard_rows, rows - lo)
        ids = np.arange(lo, lo + n)
        common = {
            "round": pa.array(np.ones(n, np.int32)),
            "problem_id": pa.array([problems[i // SAMPLES_PER_PROBLEM]["problem_id"] for i in ids]),
            "sample_idx": pa.array(ids % SAMPLES_PER_PROBLEM, pa.int32()),
        }
        for stage, schema in (("sample", SAMPLES), ("rewrite", REWRITES)):
            think = rng.integers(150, 340, n).astype(np.int32)
            columns = {
                **common,
                "completion": _text(rng, n),
                "token_ids": _token_ids(rng, n, vocab),
                "prompt_tokens": pa.array(np.full(n, 30, np.int32)),
                "think_tokens": pa.array(think),
                "answer_tokens": pa.array(TOKENS - think),
                "total_tokens": pa.array(np.full(n, TOKENS, np.int32)),
                "finish_reason": pa.array(["stop"] * n),
                "truncated": pa.array(np.zeros(n, bool)),
                "correct": pa.array(rng.random(n) < 0.7),
                "pred_answer": pa.array(["7"] * n),
                "model": pa.array([stage] * n),
                "orig_think_tokens": pa.array(think + 10),
                "orig_total_tokens": pa.array(np.full(n, TOKENS, np.int32)),
                "orig_correct": pa.array(np.ones(n, bool)),
                "orig_truncated": pa.array(np.zeros(n, bool)),
            }
            parts[stage].append(pa.table({f.name: columns[f.name] for f in schema}, schema))
        kept = ids % 2 == 0
        decisions = {
            **common,
            "kept": pa.array(kept),
            "reason": pa.array(np.where(kept, "kept", "duplicate")),
            "think_tokens": pa.array(np.full(n, 200, np.int32)),
            "orig_think_tokens": pa.array(np.full(n, 210, np.int32)),
            "ratio": pa.array(np.full(n, 0.95)),
        }
        parts["filter"].append(pa.table(decisions, DECISIONS))
    for stage, shards in parts.items():
        commit(store, stage, 1, stage[0] * 64, shards)


def _text(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` traces of ~1.4 KB: random words of lower-case letters."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz     \n", np.uint8)
    data = letters[rng.integers(0, len(letters), n * TEXT_BYTES)]
    offsets = np.arange(0, (n + 1) * TEXT_BYTES, TEXT_BYTES, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def _token_ids(rng: np.random.Generator, n: int, vocab: int) -> pa.Array:
    values = pa.array(rng.integers(3, vocab, n * TOKENS).astype(np.int32))
    offsets = pa.array(np.arange(0, (n + 1) * TOKENS, TOKENS, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


class StandInEngine:
    """Not a model: every prompt gets the same short trace, every target token the same top-k.

    It stands in for the rewriter and the teacher where what is measured is the data path
    (reading inputs, building rows, writing shards) over thousands of traces; a model would
    spend minutes on them and tell nothing more about memory. The rows it makes are well formed
    (they pass the tables' schemas), so the stages run exactly as with a model.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = "<think>\nshort\n</think>\n\nAnswer: 7"
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
        self.ids = [*ids, tokenizer.eos_token_id]

    def generate(
        self, prompts: list[list[int]], params: GenerationParams, progress: Any = None
    ) -> list[list[Completion]]:
        return [
            [Completion(i, j, list(self.ids), self.text, "stop") for j in range(params.n)]
            for i in range(len(prompts))
        ]

    def score(
        self, prompt_ids: list[list[int]], target_ids: list[list[int]], top_k: int, progress=None
    ) -> list[TokenScores]:
        ids = np.arange(top_k, dtype=np.int32)
        logprobs = -np.arange(1, top_k + 1, dtype=np.float32)
        return [
            TokenScores(np.tile(ids, (len(t), 1)), np.tile(logprobs, (len(t), 1)))
            for t in target_ids
        ]

    def close(self) -> None:
        pass


def main(workspace: str, shard_rows: str) -> int:
    import tasks.truncate

    tasks.truncate.SHARD_ROWS = int(shard_rows)
    ctx = context(Path(workspace))
    print("starting", flush=True)
    tasks.truncate.run(ctx, new_round(ctx))
    print("stage-done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

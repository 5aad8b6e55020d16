"""Teacher scores on disk: bytes per target token at k = 32, as stored and re-encoded, and
what a per-position k (``score.mass``) saves and moves in the loss.

Scores a round's worth of the built-in world's traces for real (the shipped student samples
``--problems`` training problems, the shipped teacher scores every trace at top-32 through the
score stage's own body, committed through the stage store), then reports the committed shards'
bytes per target token (logprobs stored as rank-order gaps, data/schemas.py) against the same
values stored as absolute int16 (the layout before), side by side; the two decode to each other
exactly. ``--workspace WS`` adds the committed score stages of other workspaces (e.g.
``runs/smollm2-gsm8k``: a 49,152-token vocabulary; ``runs/qwen-vocab-gsm8k``: Qwen3's 151,936,
made by ``scripts/qwen_vocab_model.py`` and ``configs/qwen-vocab-gsm8k.yaml``).

Per-position k: for the same traces, the teacher's float top-32 and the student's full
logits are computed once; the scores are stored at each ``score.mass`` (1.0 keeps all 32) and
read back as the trainer reads them, and the table prints bytes per token, the mean k kept, and
how far each top-k loss (forward KL, reverse KL, JSD; tail bucket on, as trained) moves per
token from the float top-32 loss. At mass 1.0 that is int16 quantisation's own error: the
tolerance the stored scores already accept. The world's pair is the shipped student and teacher;
a workspace's pair (the teacher its ``run.yaml`` names, its round-1 samples) is that model as the
student and the same model told to be concise as the teacher (self-distillation's teacher: with
one model in both roles and the same context, every loss is 0).

    python benchmarks/bench_scores.py [--problems 64] [--n 4] [--workspace runs/smollm2-gsm8k]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per problem")
    p.add_argument("--workspace", type=Path, action="append", default=[])
    args = p.parse_args()

    from data.prompts import CONCISE_CUE
    from data.store import StageStore
    from tasks.common import read_stage, stage_files

    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        prompts = world_scores(StageStore(ws), args.problems, args.n)
        report("built-in world (805-token vocabulary)", stage_files(StageStore(ws), "score", 1))
        samples = read_stage(StageStore(ws), "sample", 1).to_pylist()
        assets = ROOT / "world" / "assets"
        per_position_k(
            "built-in world: shipped student, shipped teacher (problem context)",
            assets / "student",
            assets / "teacher",
            [(prompts[r["problem_id"]], r["token_ids"]) for r in samples],
            teacher_context="{problem}",
        )
    for other in args.workspace:
        store = StageStore(other)
        rounds = sorted({m.round for m in store.committed() if m.stage == "score"})
        files = [f for r in rounds for f in stage_files(store, "score", r)]
        report(f"{other} (rounds {rounds})", files)
        model = workspace_teacher(other)
        if model is not None and 1 in {m.round for m in store.committed() if m.stage == "sample"}:
            problems = {
                r["problem_id"]: r["prompt"] for r in read_stage(store, "problems", 0).to_pylist()
            }
            samples = read_stage(store, "sample", 1).to_pylist()
            per_position_k(
                f"{other}: {model.name if model.name != 'model' else model.parent.name}, "
                "the teacher told to be concise",
                model,
                model,
                [(problems[r["problem_id"]], r["token_ids"]) for r in samples],
                teacher_context=CONCISE_CUE,
            )


def workspace_teacher(ws: Path) -> Path | None:
    """The teacher a workspace's run used (its ``run.yaml``), as a model directory."""
    from flows.config import load_config
    from tasks.context import resolve_model

    saved = ws / "run.yaml"
    if not saved.is_file():
        return None
    name = load_config(saved).models.teacher
    return resolve_model(name, ws) if name else None


def world_scores(store, problems: int, n: int) -> dict[str, str]:
    """Sample the shipped student on world problems, score the traces with the shipped teacher;
    returns the problems' prompts."""
    import torch

    from data.answers import answers_match
    from engines.config import EngineConfig
    from tasks.common import run_stage
    from tasks.engines import EngineHandle
    from tasks.sample import SampleConfig, sample_body
    from tasks.score import TARGET_COLUMNS, ScoreConfig, score_body
    from tasks.stream import Rows
    from world import build_problems

    torch.set_num_threads(2)
    assets = ROOT / "world" / "assets"
    records = build_problems(11, problems, 0, 0, difficulty=1)
    student = EngineHandle(EngineConfig(kind="hf"), str(assets / "student"), "float32", "cpu")
    teacher = EngineHandle(EngineConfig(kind="hf"), str(assets / "teacher"), "float32", "cpu")
    cfg = SampleConfig(problems_per_round=problems, n=n, max_tokens=512, shard_size=16)
    run_stage(
        store,
        "sample",
        1,
        "s" * 64,
        lambda w: sample_body(
            w,
            cfg,
            engine=student,
            records=records,
            round_=1,
            seed=0,
            model="s",
            grader=answers_match,
        ),
    )
    prompts = {r["problem_id"]: r["prompt"] for r in records}
    run_stage(
        store,
        "score",
        1,
        "t" * 64,
        lambda w: score_body(
            w,
            ScoreConfig(top_k=32, context="problem"),  # the default shards: 64 traces
            engine=teacher.get(),
            targets=Rows.of(store, "sample", 1, TARGET_COLUMNS),
            samples=None,
            problems={r["problem_id"]: r for r in records},
            rewrite_template="{problem}\n{trace}",
            round_=1,
            model="t",
        ),
    )
    return prompts


def report(name: str, files: list[Path]) -> None:
    """Bytes per target token as committed, and the same values as absolute int16 (the layout
    before rank-order gaps), side by side; each layout decodes to the other exactly."""
    from data.schemas import logprob_gaps

    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    tokens = int(pc.sum(table.column("num_tokens")).as_py())
    k = int(table.column("k")[0].as_py())
    stored = sum(f.stat().st_size for f in files)
    ids = table.column("topk_ids").combine_chunks()
    if "topk_logprob_gaps" in table.column_names:
        gaps = table.column("topk_logprob_gaps").combine_chunks()
    else:  # a shard committed before the gaps: its absolute values, re-encoded here
        old = table.column("topk_logprobs_q").combine_chunks()
        flat = logprob_gaps(old.values.to_numpy().reshape(-1, k)).reshape(-1)
        gaps = pa.ListArray.from_arrays(old.offsets, pa.array(flat, pa.int16()))
    columns = [ids, gaps]
    counts = None
    if "topk_counts" in table.column_names and table.column("topk_counts").null_count < len(table):
        counts = table.column("topk_counts").combine_chunks()
        columns.append(counts)
    # absolute values: each position's running sum of its gaps (positions of any length)
    g = gaps.values.to_numpy().astype(np.int64)
    n_tokens = table.column("num_tokens").to_pylist()
    per_row = counts.to_pylist() if counts is not None else [None] * len(n_tokens)
    per_position = np.concatenate(
        [
            np.full(n, k) if c is None else np.asarray(c)
            for c, n in zip(per_row, n_tokens, strict=True)
        ]
    ).astype(np.int64)
    starts = np.repeat(np.cumsum(per_position) - per_position, per_position)
    running = np.cumsum(g)
    absolute = -(running - np.concatenate([[0], running])[starts])
    values = pa.ListArray.from_arrays(gaps.offsets, pa.array(absolute.astype(np.int16)))
    now, before = nbytes(columns), nbytes([ids, values, *columns[2:]])
    kept = len(g) / tokens
    print(
        f"{name}: {table.num_rows} traces, {tokens} target tokens, k = {k} (mean kept {kept:.1f})"
    )
    print(f"  as committed (every column, zstd):        {stored / tokens:6.1f} B/token")
    print(f"  ids + logprob gaps (as stored):           {now / tokens:6.1f} B/token")
    print(f"    of which ids {nbytes([ids]) / tokens:.1f}, gaps {nbytes([gaps]) / tokens:.1f}")
    print(f"  ids + absolute int16 logprobs (before):   {before / tokens:6.1f} B/token")
    print(f"ratio stored / before: {now / before:.2f}x (target: <= 80 B/token at k = 32)")


MASSES = (1.0, 0.9999, 0.999, 0.99)
KINDS = ("forward_kl", "reverse_kl", "jsd")


def per_position_k(
    name: str,
    student_dir: Path,
    teacher_dir: Path,
    items: list[tuple[str, list[int]]],
    *,
    teacher_context: str,
    k: int = 32,
) -> None:
    """Bytes per token and the per-token loss's move from the float top-k, at each mass."""
    import torch

    from data.schemas import decode_topk, encode_topk
    from tasks.generation import chat_prompt
    from train.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    tok = load_tokenizer(student_dir)
    student = load_model(student_dir, device="cpu").eval()
    teacher = (
        student if teacher_dir == student_dir else load_model(teacher_dir, device="cpu").eval()
    )
    tokens = sum(len(t) for _, t in items)
    moved = {(m, kind): 0.0 for m in MASSES for kind in KINDS}
    reference_sum = dict.fromkeys(KINDS, 0.0)
    stored: dict[float, list[tuple]] = {m: [] for m in MASSES}
    for question, target in items:
        logits = []
        with torch.no_grad():
            for model, q in (
                (student, question),
                (teacher, teacher_context.format(problem=question)),
            ):
                prompt = chat_prompt(tok, q)
                ids = torch.tensor([prompt + list(target)])
                logits.append(model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(target)])
        s_logits, t_logits = logits[0][None].float(), logits[1].float()
        top = torch.log_softmax(t_logits, -1).topk(k)
        mask = torch.ones(1, len(target), dtype=torch.bool)

        ids_np, lp_np = top.indices.numpy(), top.values.numpy()
        reference = {kind: _loss(s_logits, ids_np, lp_np, mask, kind) for kind in KINDS}
        for m in MASSES:
            flat_ids, gaps, counts = encode_topk(ids_np, lp_np, m)
            stored[m].append((flat_ids, gaps, counts))
            dec_ids, dec_lp = decode_topk(flat_ids, gaps, k, counts)
            for kind in KINDS:
                moved[(m, kind)] += float(
                    (_loss(s_logits, dec_ids, dec_lp, mask, kind) - reference[kind]).abs().sum()
                )
        for kind in KINDS:
            reference_sum[kind] += float(reference[kind].sum())
    print(f"{name}: {len(items)} traces, {tokens} tokens; per-position k at each score.mass")
    print("  mean per-token loss (float top-32): " + ", ".join(
        f"{kind} {reference_sum[kind] / tokens:.4f}" for kind in KINDS
    ))  # fmt: skip
    print("  mass     B/token  mean k   mean |loss - float top-32 loss| per token")
    for m in MASSES:
        rows = stored[m]
        columns = [
            pa.array([r[0].astype(np.int32) for r in rows], pa.list_(pa.int32())),
            pa.array([r[1] for r in rows], pa.list_(pa.int16())),
        ]
        kept = sum(len(r[0]) for r in rows) / tokens
        if m < 1.0:
            counts = [None if r[2] is None else r[2].astype(np.int16) for r in rows]
            columns.append(pa.array(counts, pa.list_(pa.int16())))  # null: all k
        errors = ", ".join(f"{kind} {moved[(m, kind)] / tokens:.2e}" for kind in KINDS)
        note = "  (int16 quantisation alone)" if m == 1.0 else ""
        print(f"  {m:<7} {nbytes(columns) / tokens:7.1f}  {kept:6.1f}   {errors}{note}")


def _loss(s_logits, ids: np.ndarray, lp: np.ndarray, mask, kind: str):
    """Per-token top-k loss of one trace, as the trainer computes it (tail bucket on)."""
    import torch

    from train.topk_losses import topk_per_token_divergence

    ids_t, lp_t = torch.from_numpy(ids)[None], torch.from_numpy(lp)[None]
    return topk_per_token_divergence(s_logits, ids_t, lp_t, mask, kind=kind, tail=True)[0]


def nbytes(columns: list[pa.Array]) -> int:
    """Bytes of these columns alone in a zstd Parquet file (as the store writes)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({f"c{i}": c for i, c in enumerate(columns)}), buf, compression="zstd")
    return buf.getbuffer().nbytes


if __name__ == "__main__":
    main()

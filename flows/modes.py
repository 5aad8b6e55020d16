"""Every method as a mode of the same round DAG: which stages a round runs, what it trains on.

    method          trains on (the targets)                         stages before train
    mpd             the teacher's rewrites of the student's         sample rewrite score filter
                    samples, filtered; KL to the teacher
    on_policy       the student's own samples, all; KL to the       sample score
                    teacher
    off_policy      the teacher's own solutions, all; KL (or CE)    solve score
    self_distill    the student's own samples, all; reverse KL to   sample score
                    a frozen copy of the student told to be concise
    sft_compressed  the filtered rewrites; cross-entropy, LoRA      sample rewrite filter
    truncation      each kept rewrite's sample, cut to the          sample rewrite filter truncate
                    rewrite's length + its answer; CE, LoRA

``score`` runs whenever the loss needs the teacher's stored top-k (a KL loss with
``teacher_mode: offline_topk``); with ``loss: ce`` or an online teacher it is skipped.
Then ``train`` and ``eval``, the same for every method.

Why these choices:

- on_policy, off_policy and self_distill train on every target, unfiltered: the
  KL to the teacher is the correction (GKD, sequence-level KD, OPSDC do not filter),
  and a filter needs a shorter-than-the-original reference only rewrites have.
- Only rewriting methods filter; the filter SQL is the same file for all of them,
  so mpd, sft_compressed and truncation keep the same rows and differ only in the
  target text and the loss.
- No stage key contains the method. Methods that run the same stage on the same
  inputs share it: the round-1 sample of mpd, on_policy, self_distill,
  sft_compressed and truncation is one computation (and round 0's eval is one for
  all six), and rewrite and filter are shared by the three rewriting methods.
  Later rounds differ because the students differ.

A mode's ``preset`` holds the knobs it changes from the default recipe (``configs/<method>.yaml``
holds the same on ``base: tiny.yaml``, a test keeps them equal); ``mpd bench`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import tasks.sample
import tasks.truncate
from flows import stages
from flows.config import RunConfig
from flows.errors import UserError
from flows.stages import Context, StageResult, Student, Targets, kept_pairs
from tasks.common import read_stage


@dataclass(frozen=True)
class Mode:
    """How a method's round differs: the table it trains on, filtered or not, whose teacher."""

    targets: Literal["sample", "solve", "rewrite", "truncate"]
    filtered: bool
    self_teacher: bool = False
    preset: dict[str, Any] = field(default_factory=dict)


# LoRA adapters learn at about ten times a full fine-tune's rate (and tiny.yaml's is gentle): the SFT
# baselines get their customary rate, the same steps and batch as every method.
SFT = {"train.loss": "ce", "train.lora.enabled": True, "train.lr": 1e-3}
MODES: dict[str, Mode] = {
    "mpd": Mode("rewrite", filtered=True),
    "on_policy": Mode("sample", filtered=False),
    "off_policy": Mode("solve", filtered=False, preset={"train.loss": "forward_kl"}),
    "self_distill": Mode("sample", filtered=False, self_teacher=True),
    "sft_compressed": Mode("rewrite", filtered=True, preset=SFT),
    "truncation": Mode("truncate", filtered=True, preset=SFT),
}


def needs_score(cfg: RunConfig) -> bool:
    """The score stage runs when the loss reads the teacher's stored top-k."""
    return cfg.train.loss != "ce" and cfg.train.teacher_mode == "offline_topk"


def round_stages(cfg: RunConfig) -> list[str]:
    """The stages one round of ``cfg.method`` runs, in the order it runs them."""
    mode = MODES[cfg.method]
    out = ["solve"] if mode.targets == "solve" else ["sample"]
    if mode.targets in ("rewrite", "truncate"):
        out.append("rewrite")
    if needs_score(cfg) and mode.targets != "truncate":
        out.append("score")  # before the filter: a filter knob must not re-score
    if mode.filtered:
        out.append("filter")
    if mode.targets == "truncate":
        out += ["truncate", "score"] if needs_score(cfg) else ["truncate"]
    return [*out, "train", "eval"]


def round_targets(ctx: Context, r: int, student: Student) -> Targets:
    """Run the stages before ``train`` that round ``r`` of the method needs; return its targets."""
    cfg = ctx.cfg
    mode = MODES[cfg.method]
    teacher = self_distill_teacher(ctx, r) if mode.self_teacher else None
    instruction = cfg.self_distill.instruction if mode.self_teacher else None
    scored = filtered = None
    if mode.targets == "solve":
        data = solve(ctx, r)
    else:
        data = sampled = stages.sample(ctx, r, student)
    if mode.targets in ("rewrite", "truncate"):
        data = rewritten = stages.rewrite(ctx, r, sampled, student)
    if needs_score(cfg) and mode.targets != "truncate":
        scored = stages.score(ctx, r, data, teacher=teacher, instruction=instruction)
    if mode.filtered:
        filtered = stages.filter_(ctx, r, rewritten)
        check_kept(ctx, r, filtered)
    if mode.targets == "truncate":
        assert filtered is not None
        data = truncate(ctx, r, sampled, rewritten, filtered, student)
        filtered = None  # a truncation exists only for a kept rewrite
        scored = stages.score(ctx, r, data) if needs_score(cfg) else None
    return Targets(data, filtered, scored, teacher, instruction)


def check_kept(ctx: Context, r: int, filtered: StageResult) -> None:
    """A filter that kept nothing ends the round with one line: training on nothing is no round."""
    kept, reasons = stages.kept_count(ctx, r)
    if kept == 0:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        raise UserError(
            f"round {r}: the filter kept none of {filtered.rows} rewrites ({why}); nothing was "
            f'trained. Inspect them with: mpd sql "select * from decisions where round = {r}"'
        )


def self_distill_teacher(ctx: Context, r: int) -> Student:
    """The frozen copy: the student that started round 1 + M·⌊(r−1)/M⌋, M = refresh_every."""
    every = ctx.cfg.self_distill.refresh_every
    return ctx.students[(r - 1) // every * every]


def solve(ctx: Context, r: int) -> StageResult:
    """off_policy: the teacher answers the round's problems as the student would (solutions)."""
    name = ctx.cfg.models.teacher
    teacher = Student(path=str(ctx.model_path(name)), identity=ctx.identity(name))
    return stages.generate_answers(ctx, r, "solve", "teacher", teacher, name)


def truncate(
    ctx: Context,
    r: int,
    sampled: StageResult,
    rewritten: StageResult,
    filtered: StageResult,
    student: Student,
) -> StageResult:
    """truncation: each kept rewrite's student sample, cut to the rewrite's length."""
    key, code = ctx.key(
        "truncate",
        tasks.truncate,
        wiring=__name__,
        config={},
        inputs={"sample": sampled.key, "rewrite": rewritten.key, "filter": filtered.key},
    )

    def body(w: Any) -> dict:
        from train.models import load_tokenizer

        rows = tasks.truncate.truncate_rows(
            read_stage(ctx.store, "sample", r).to_pylist(),
            read_stage(ctx.store, "rewrite", r).to_pylist(),
            kept_pairs(ctx, r),
            tokenizer=load_tokenizer(student.path),
            problems=ctx.problems,
            grader=ctx.grader,
        )
        return tasks.truncate.truncate_body(w, rows)

    return ctx.run("truncate", r, key, code, body)

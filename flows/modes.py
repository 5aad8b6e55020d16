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
    self_train      the student's own shortest correct sample of    sample self_select
                    n >= 4 per problem; CE (rejection-sampling
                    self-training: no teacher at all)
    mpd_unfiltered  every rewrite of the student's samples, wrong   sample rewrite score
                    or longer ones included; KL to the teacher
                    (MPD without its filter)

``score`` runs whenever the loss needs the teacher's stored top-k (a KL loss with
``teacher_mode: offline_topk``); with ``loss: ce`` or an online teacher it is skipped.
Then ``train`` and ``eval``, the same for every method.

Why these choices:

- on_policy, off_policy and self_distill train on every target, unfiltered: the
  KL to the teacher is the correction (GKD, sequence-level KD, OPSDC do not filter),
  and a filter needs a shorter-than-the-original reference only rewrites have.
- The two ablations isolate MPD's parts. self_train keeps only correct targets, as MPD does,
  but the student's own: what is left of MPD's gain there is not the teacher's. mpd_unfiltered
  is MPD with every rewrite: what it loses is the filter's (the gold labels') share.
- Only rewriting methods filter; the filter SQL is the same file for all of them,
  so mpd, sft_compressed and truncation keep the same rows and differ only in the
  target text and the loss.
- No stage key contains the method. Methods that run the same stage on the same
  inputs share it: the round-1 sample of mpd, on_policy, self_distill,
  sft_compressed and truncation is one computation (and round 0's eval is one for
  all six), and rewrite and filter are shared by the three rewriting methods.
  Later rounds differ because the students differ.

The round plan is computed from the stages' declarations (:func:`tasks.registry.round_plan`):
a method is a :class:`Mode` (what it trains on, filtered or not, whose teacher), which with
the config gives the round's :class:`tasks.context.Recipe`; train and eval run every round,
and what they read, transitively, runs before them. The campaign runs exactly those stages
(each one's ``run`` from its declaration in ``tasks/``), ``mpd status`` lists them and
``mpd rerun`` follows them; :func:`plan_keys` computes every key of a campaign without running
anything (``mpd status --keys``).

A mode's ``preset`` holds the knobs it changes from the default recipe (``configs/<method>.yaml``
holds the same on ``base: tiny.yaml``, a test keeps them equal); ``mpd bench`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flows.config import SELF_TRAIN_MIN_N, RunConfig
from tasks.common import StageResult
from tasks.context import Context, ModelRef, Recipe, Round
from tasks.registry import STAGES, campaign_stages, round_plan
from tasks.stagekey import StageKey


@dataclass(frozen=True)
class Mode:
    """How a method's round differs: the table it trains on, filtered or not, whose teacher."""

    targets: Literal["sample", "solve", "rewrite", "truncate", "self_select"]
    filtered: bool
    self_teacher: bool = False
    preset: dict[str, Any] = field(default_factory=dict)


# The SFT baselines' rate, like every method's, is the one `mpd bench --tune lr=3e-5,1e-4,1e-3`
# chose on the dev split (docs/bench.md): 3e-5. LoRA's customary 1e-3 compressed on dev but lost
# 5.5 and 16 points, beyond the rule's tolerance; the same steps and batch as every method.
SFT = {"train.loss": "ce", "train.lora.enabled": True, "train.lr": 3e-5}
# Self-training needs several tries per problem (flows/config.py SELF_TRAIN_MIN_N) for a short
# correct one to be among them; it trains the whole model, as MPD does, so that only the
# targets and the loss differ.
MODES: dict[str, Mode] = {
    "mpd": Mode("rewrite", filtered=True),
    "on_policy": Mode("sample", filtered=False),
    "off_policy": Mode("solve", filtered=False, preset={"train.loss": "forward_kl"}),
    "self_distill": Mode("sample", filtered=False, self_teacher=True),
    "sft_compressed": Mode("rewrite", filtered=True, preset=SFT),
    "truncation": Mode("truncate", filtered=True, preset=SFT),
    "self_train": Mode(
        "self_select", filtered=False, preset={"train.loss": "ce", "sample.n": SELF_TRAIN_MIN_N}
    ),
    "mpd_unfiltered": Mode("rewrite", filtered=False),
}


def needs_score(cfg: RunConfig) -> bool:
    """The score stage runs when the loss reads the teacher's stored top-k."""
    return cfg.train.loss != "ce" and cfg.train.teacher_mode == "offline_topk"


def recipe(cfg: RunConfig) -> Recipe:
    """What a round of ``cfg.method`` trains on, as the stages' declarations read it."""
    mode = MODES[cfg.method]
    return Recipe(
        targets=mode.targets,
        # a truncation exists only for a kept rewrite: its table needs no filtering
        kept_only=mode.filtered and mode.targets != "truncate",
        scored=needs_score(cfg),
        self_teacher=mode.self_teacher,
    )


START = Recipe(start=True)  # round 0: the starting student's evaluation


def round_stages(cfg: RunConfig) -> list[str]:
    """The stages one round of ``cfg.method`` runs, in the order it runs them."""
    return round_plan(recipe(cfg))


def new_round(ctx: Context, r: int, student: ModelRef) -> Round:
    """Round ``r`` of ``ctx.cfg.method``, starting from ``student``: what it trains on."""
    rc = recipe(ctx.cfg)
    return Round(
        r,
        student,
        recipe=rc,
        teacher=self_distill_teacher(ctx, r) if rc.self_teacher else None,
        instruction=ctx.cfg.self_distill.instruction if rc.self_teacher else None,
    )


def run_setup(ctx: Context) -> None:
    """The campaign-level stages the config needs (the world's models, the problems)."""
    for name in campaign_stages(ctx.cfg):
        STAGES[name].run(ctx, ctx.setup)


def run_round(ctx: Context, r: int, student: ModelRef) -> ModelRef:
    """Round ``r``: every stage of its plan, in order; returns the student it trained."""
    rnd = new_round(ctx, r, student)
    for name in round_stages(ctx.cfg):
        STAGES[name].run(ctx, rnd)
    return rnd.student


def evaluate_start(ctx: Context, student: ModelRef) -> None:
    """Round 0: the starting student's evaluation, shared by every method."""
    rnd = Round(0, student, recipe=START)
    for name in round_plan(START):
        STAGES[name].run(ctx, rnd)


def self_distill_teacher(ctx: Context, r: int) -> ModelRef:
    """The frozen copy: the student that started round 1 + M·⌊(r−1)/M⌋, M = refresh_every."""
    every = ctx.cfg.self_distill.refresh_every
    return ctx.students[(r - 1) // every * every]


def plan_keys(cfg: RunConfig, rounds: int | None = None) -> list[tuple[int, str, StageKey]]:
    """Every (round, stage) key a campaign of ``cfg`` (``rounds`` rounds, default the config's)
    would use, in run order, computed from the declarations alone: nothing runs, nothing is
    read but the models' and input files' digests. A trained student's identity is its train
    stage's key, so later rounds' keys need no earlier round computed.
    """
    ctx, out = Context(cfg), []

    def dry(stage: str, rnd: Round) -> None:
        key = ctx.key(STAGES[stage], rnd)
        path = str(ctx.store.stage_dir(stage, rnd.r))
        ctx.record(STAGES[stage], rnd, StageResult(stage, rnd.r, key.key, 0, True, 0.0, path))
        out.append((rnd.r, stage, key))

    for name in campaign_stages(cfg):
        dry(name, ctx.setup)
    student = ctx.starting_student()
    start = Round(0, student, recipe=START)
    for name in round_plan(START):
        dry(name, start)
    for r in range(1, (cfg.rounds if rounds is None else rounds) + 1):
        rnd = new_round(ctx, r, student)
        for name in round_stages(cfg):
            dry(name, rnd)
        student = rnd.student
    return out

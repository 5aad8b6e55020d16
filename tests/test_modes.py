"""Every method as a mode of the one round DAG: a tiny round of each, end to end, sharing stages.

One module fixture runs the six methods one after another, each with ``mpd run`` (in this
process, against the session's Prefect server) in its own workspace, each naming the
workspaces before it in ``cache_from:``, as ``mpd bench`` does. Budgets are tiny (8 problems,
48 generated tokens, 3 training steps, 2 evaluation problems), and a user filter keeps the
first rewrite of every problem (most 48-token rewrites are truncated: the built-in filter
would keep nothing). What is checked is the wiring: which stages each method runs, what it
trains on, and that a stage two methods share is computed once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.store import StageStore
from flows.config import REPO_ROOT, load_config
from flows.modes import MODES, round_stages
from tasks.common import read_stage

pytestmark = pytest.mark.usefixtures("prefect_api")

KEEP_FIRST = Path(__file__).resolve().parent / "fixtures" / "keep_first_filter.sql"
ORDER = [
    "mpd",
    "on_policy",
    "off_policy",
    "self_distill",
    "sft_compressed",
    "truncation",
    "self_train",
    "mpd_unfiltered",
]
# self_train needs correct samples to select from: 48 tokens end every trace before its answer.
EXTRA: dict[str, dict[str, object]] = {"self_train": {"sample.max_tokens": 400}}
TINY: dict[str, object] = {
    "problems.n_train": 40,
    "problems.n_test": 10,
    "problems.n_heldout": 5,
    "sample.problems_per_round": 4,
    "sample.n": 2,
    "sample.shard_size": 4,
    "sample.max_tokens": 48,
    "rewrite.max_tokens": 48,
    "score.context": "rewrite",
    "score.top_k": 8,
    "filter.sql": KEEP_FIRST,
    "train.steps": 2,
    "train.batch_size": 2,
    "train.warmup_steps": 0,
    "train.checkpoint_every": 10,
    "evaluate.limit": 1,
    "evaluate.max_tokens": 16,
}


def overrides(method: str, others: list[Path], extra: dict[str, object] | None = None) -> list[str]:
    """What ``mpd bench`` gives a member: its preset, the method, the workspaces to share."""
    preset = {k: json.dumps(v) for k, v in MODES[method].preset.items()}
    changes = {**preset, "method": method, "cache_from": json.dumps([str(p) for p in others])}
    return [f"{k}={v}" for k, v in {**TINY, **changes, **(extra or {})}.items()]


def run_mode(ws: Path, method: str, others: list[Path], extra: dict | None = None) -> None:
    from flows.cli import main

    sets = [a for o in overrides(method, others, extra) for a in ("--set", o)]
    assert main(["run", "-w", str(ws), "--rounds", "1", *sets]) == 0


def outcomes(ws: Path) -> dict[str, str]:
    stages = json.loads((ws / ".mpd" / "last_run.json").read_text())["stages"]
    return {where: o["state"] for where, o in stages.items()}


def manifest(ws: Path, stage: str, round_: int = 1) -> dict:
    return json.loads((ws / stage / f"round={round_}" / "_manifest.json").read_text())


def rows(ws: Path, stage: str, round_: int = 1) -> list[dict]:
    return read_stage(StageStore(ws), stage, round_).to_pylist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modes")
    done: dict[str, Path] = {}
    for method in ORDER:
        run_mode(root / method, method, list(done.values()), EXTRA.get(method))
        done[method] = root / method
    online = {"train.teacher_mode": "online"}
    run_mode(root / "self_distill_online", "self_distill", list(done.values()), online)
    done["self_distill_online"] = root / "self_distill_online"
    return done


def test_each_mode_runs_its_stages_and_only_those(runs: dict[str, Path]) -> None:
    """One round of every method reaches train and eval through exactly its planned stages."""
    for method, ws in runs.items():
        cfg = load_config(ws / "run.yaml")
        planned = round_stages(cfg)
        assert outcomes(ws).keys() == {"0/eval", *(f"1/{s}" for s in planned)}, method
        assert set(outcomes(ws).values()) <= {"done", "cached"}, method
        committed = {m.stage for m in StageStore(ws).committed() if m.round == 1}
        assert committed == set(planned), method
    assert round_stages(load_config(None, overrides("mpd", []))) == [
        "sample",
        "rewrite",
        "score",
        "filter",
        "train",
        "eval",
    ]


def test_shared_stages_hit_the_cache(runs: dict[str, Path]) -> None:
    """A stage with the same key in an earlier method's workspace is adopted, not recomputed:
    round 0's evaluation for all, round 1's sample for every sampling method, rewrite and
    filter for the rewriting ones; a stage whose inputs differ is computed."""
    mpd = runs["mpd"]
    expected = {
        "on_policy": {"0/eval": "cached", "1/sample": "cached", "1/score": "done"},
        "off_policy": {"0/eval": "cached", "1/solve": "done", "1/score": "done"},
        "self_distill": {"0/eval": "cached", "1/sample": "cached", "1/score": "done"},
        "sft_compressed": {"1/sample": "cached", "1/rewrite": "cached", "1/filter": "cached"},
        "truncation": {"1/rewrite": "cached", "1/filter": "cached", "1/truncate": "done"},
        # MPD without the filter: every stage before train is MPD's own
        "mpd_unfiltered": {
            "0/eval": "cached",
            "1/sample": "cached",
            "1/rewrite": "cached",
            "1/score": "cached",
        },
        # four samples per problem: a sample stage of its own
        "self_train": {"0/eval": "cached", "1/sample": "done", "1/self_select": "done"},
    }
    for method, states in expected.items():
        got = outcomes(runs[method])
        assert {k: got[k] for k in states} == states, method
        assert got["1/train"] == "done" and got["1/eval"] == "done", method
    for method in ("on_policy", "self_distill", "sft_compressed", "truncation"):
        shared = manifest(runs[method], "sample")
        assert shared["key"] == manifest(mpd, "sample")["key"], method
        assert shared["extra"]["shared_from"] == str(mpd.resolve()), method
        part = "sample/round=1/part-00000.parquet"
        assert (runs[method] / part).stat().st_ino == (mpd / part).stat().st_ino, "hard link"
    assert "shared_from" not in manifest(mpd, "sample")["extra"]


def test_each_mode_trains_on_its_own_targets(runs: dict[str, Path]) -> None:
    """What reaches the trainer: rewrites kept by the filter (mpd, sft_compressed), every
    student sample (on_policy, self_distill), every teacher solution (off_policy), the cut
    samples (truncation); the teacher that scored them; the loss of the method."""

    def examples(method: str) -> int:
        return manifest(runs[method], "train")["extra"]["examples"]

    n_samples = len(rows(runs["mpd"], "sample"))
    kept = sum(d["kept"] for d in rows(runs["mpd"], "filter"))
    assert examples("mpd") == examples("sft_compressed") == kept < n_samples
    assert examples("on_policy") == examples("self_distill") == n_samples
    assert examples("off_policy") == len(rows(runs["off_policy"], "solve")) == n_samples
    assert examples("truncation") == kept

    scores = {m: rows(runs[m], "score") for m in ("mpd", "on_policy", "off_policy", "self_distill")}
    assert {s["context"] for s in scores["mpd"]} == {"rewrite"}
    assert {s["context"] for s in scores["off_policy"]} == {"problem"}  # where it solved
    assert {s["context"] for s in scores["self_distill"]} == {"concise"}
    starting_student = rows(runs["mpd"], "eval", 0)[0]["model"]  # its identity, 12 digits
    assert {s["model"] for s in scores["self_distill"]} == {f"self:{starting_student}"}
    assert {s["model"] for s in rows(runs["off_policy"], "solve")} == {"builtin:tiny-teacher"}
    ran = {m: load_config(runs[m] / "run.yaml").train for m in ORDER}
    assert ran["sft_compressed"].loss == ran["truncation"].loss == "ce"
    assert ran["sft_compressed"].lora.enabled and not ran["mpd"].lora.enabled
    assert ran["off_policy"].loss == "forward_kl"
    assert ran["self_train"].loss == "ce" and not ran["self_train"].lora.enabled
    assert ran["mpd_unfiltered"] == ran["mpd"]


def test_the_ablations_train_on_their_own_targets(runs: dict[str, Path]) -> None:
    """mpd_unfiltered learns every rewrite (the filter dropped some of them in mpd);
    self_train learns its own shortest correct sample of four, one per problem that has one."""
    rewrites = rows(runs["mpd"], "rewrite")
    kept = sum(d["kept"] for d in rows(runs["mpd"], "filter"))
    unfiltered = manifest(runs["mpd_unfiltered"], "train")["extra"]["examples"]
    assert unfiltered == len(rewrites) > kept
    assert "filter" not in {m.stage for m in StageStore(runs["mpd_unfiltered"]).committed()}

    ws = runs["self_train"]
    samples = rows(ws, "sample")
    assert load_config(ws / "run.yaml").sample.n == 4
    assert {s["sample_idx"] for s in samples} == {0, 1, 2, 3}
    best: dict[str, tuple] = {}
    for s in samples:
        rank = (s["think_tokens"], s["total_tokens"], s["sample_idx"])
        if s["correct"] and not s["truncated"] and rank < best.get(s["problem_id"], (1e9,)):
            best[s["problem_id"]] = rank
    selected = rows(ws, "self_select")
    assert {r["problem_id"]: r["sample_idx"] for r in selected} == {
        p: rank[2] for p, rank in best.items()
    }
    assert manifest(ws, "train")["extra"]["examples"] == len(selected) == len(best) > 0


def test_truncation_targets_are_cut_samples_with_the_rewrites_answer(
    runs: dict[str, Path],
) -> None:
    ws = runs["truncation"]
    samples = {(s["problem_id"], s["sample_idx"]): s for s in rows(ws, "sample")}
    rewrites = {(r["problem_id"], r["sample_idx"]): r for r in rows(ws, "rewrite")}
    from train.models import load_tokenizer

    close = load_tokenizer(ws / "bootstrap" / "round=0" / "student").convert_tokens_to_ids(
        "</think>"
    )
    for t in rows(ws, "truncate"):
        s, r = (
            samples[(t["problem_id"], t["sample_idx"])],
            rewrites[(t["problem_id"], t["sample_idx"])],
        )
        assert t["orig_think_tokens"] == s["think_tokens"]
        reasoning = (
            s["token_ids"][: s["think_tokens"] - 1] if close in s["token_ids"] else s["token_ids"]
        )
        if close in r["token_ids"]:
            n = r["think_tokens"] - 1
            assert t["token_ids"][: min(n, len(reasoning))] == reasoning[:n]
            assert (
                t["token_ids"][-r["answer_tokens"] - 1 :]
                == r["token_ids"][-r["answer_tokens"] - 1 :]
            )
        else:
            assert t["token_ids"] == reasoning[: r["think_tokens"]]


def test_truncated_ids_keep_the_answer() -> None:
    from tasks.truncate import truncated_ids

    close, eos = 9, 0
    sample = [1, 10, 11, 12, 13, 14, 9, 20, 21, eos]  # <think> 5 steps </think> answer EOS
    rewrite = [1, 30, 9, 40, eos]
    assert truncated_ids(sample, rewrite, close) == [1, 10, 9, 40, eos]
    assert truncated_ids([1, 10, 11, 12], rewrite, close) == [1, 10, 9, 40, eos]  # no answer
    assert truncated_ids(sample, [1, 30, 31], close) == [1, 10, 11]  # rewrite cut off too


def test_self_distill_teacher_is_refreshed_every_m_rounds() -> None:
    from types import SimpleNamespace

    from flows.modes import self_distill_teacher

    students = {r: f"student after round {r}" for r in range(6)}
    for every, want in ((1, [0, 1, 2, 3, 4]), (2, [0, 0, 2, 2, 4]), (3, [0, 0, 0, 3, 3])):
        cfg = SimpleNamespace(self_distill=SimpleNamespace(refresh_every=every))
        ctx = SimpleNamespace(cfg=cfg, students=students)
        got = [self_distill_teacher(ctx, r) for r in range(1, 6)]  # type: ignore[arg-type]
        assert got == [students[w] for w in want], every


def test_mode_configs_are_the_default_recipe_plus_their_preset() -> None:
    """configs/<method>.yaml = tiny.yaml + the method's preset (what mpd bench applies)."""
    for method, mode in MODES.items():
        path = REPO_ROOT / "configs" / f"{method}.yaml"
        want = load_config(
            None,
            [
                *(f"{k}={json.dumps(v)}" for k, v in mode.preset.items()),
                f"method={method}",
                f"workspace=runs/{method}",
            ],
        )
        assert load_config(path) == want, method


def test_status_plans_the_method_stages(runs: dict[str, Path]) -> None:
    from flows.status import collect

    ws = runs["off_policy"]
    cfg = load_config(ws / "run.yaml")
    states = {(s.round, s.stage): s.state for s in collect(ws, 1, round_stages(cfg))}
    assert (1, "rewrite") not in states and states[(1, "solve")] == "done"
    assert "missing" not in states.values()


def test_self_distill_with_an_online_teacher_runs_the_frozen_copy_in_the_trainer(
    runs: dict[str, Path],
) -> None:
    """teacher_mode: online skips the score stage: the trainer runs the frozen student on the
    concise context itself, on every sample (shared with the offline run: same key)."""
    ws = runs["self_distill_online"]
    assert outcomes(ws) == {
        "0/eval": "cached",
        "1/sample": "cached",
        "1/train": "done",
        "1/eval": "done",
    }
    assert manifest(ws, "train")["extra"]["examples"] == len(rows(runs["mpd"], "sample"))

"""The shipped world has the properties MPD's demonstration rests on (issue: the reference world).

Two kinds of check, both quick:
- the bootstrap's own evaluation (``world/assets/evals.parquet``, the ``bootstrap_evals``
  table of every workspace) holds them, read with the SQL a user would run;
- the shipped models, run here, still behave as those rows say (a slice of them, greedy):
  the rows are not a stale record of other weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data import catalog
from flows.bootstrap import SHIPPED, ensure_bootstrap
from flows.config import load_config

PROPERTIES_SQL = """
select role, count(*) as n, avg(correct::int) as accuracy, avg(think_tokens) as think,
       avg((style = 'verbose')::int) as verbose_share, avg((style = 'steps')::int) as steps_share
from bootstrap_evals where split = 'test' group by role order by role
"""
REWRITE_SQL = """
select count(*) as n, avg(correct::int) as keeps_correct,
       avg(think_tokens / orig_think_tokens) as think_ratio
from bootstrap_evals where role = 'rewrite' and split = 'test' and orig_correct
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the shipped world installed, as ``mpd bootstrap`` does it."""
    from data.store import StageStore

    path = tmp_path_factory.mktemp("world")
    cfg = load_config(None, [f"workspace={path}"])
    ensure_bootstrap(StageStore(path), cfg)
    catalog.write_catalog(path)
    return path


def _by_role(ws: Path) -> dict[str, dict]:
    return {r["role"]: r for r in catalog.run_query(ws, PROPERTIES_SQL).to_pylist()}


def test_student_has_a_verbose_habit_and_a_cued_short_mode(ws: Path) -> None:
    roles = _by_role(ws)
    plain, cued = roles["student"], roles["student_cued"]
    assert plain["n"] == cued["n"] >= 400
    assert plain["verbose_share"] >= 0.95, "the plain prompt greedy-decodes the verbose habit"
    assert cued["steps_share"] >= 0.95, "the concise cue reaches the steps style"
    assert cued["accuracy"] >= plain["accuracy"] - 0.02, "the short mode is as competent"
    assert plain["think"] >= 1.8 * cued["think"], "and half as long"
    assert 0.5 <= plain["accuracy"] <= 0.85, "imperfect: there is something to keep"


def test_teacher_rewrites_correct_traces_short_and_correct(ws: Path) -> None:
    (row,) = catalog.run_query(ws, REWRITE_SQL).to_pylist()
    assert row["n"] >= 200
    assert row["keeps_correct"] >= 0.95
    assert row["think_ratio"] <= 0.6


def test_the_shipped_models_still_behave_as_their_rows_say(ws: Path) -> None:
    """Greedy-decode a slice of the eval problems with the shipped student: same styles,
    same answers as the committed rows (greedy decoding is deterministic on one machine;
    a different CPU may flip a near-tie, hence the one-problem allowance)."""
    import pyarrow.parquet as pq

    from data.answers import format_prompt
    from data.prompts import cued_prompt
    from engines.hf import HFEngine
    from train.models import load_model, load_tokenizer
    from world import build_problems
    from world.bootstrap import generate_rows

    evals = pq.read_table(SHIPPED / "evals.parquet").to_pylist()
    records = {r["problem_id"]: r for r in build_problems(0, 0, 1000, 100, (1, 2))}
    chosen = [r for r in evals if r["role"] == "student" and r["split"] == "test"][:24]
    recs = [records[r["problem_id"]] for r in chosen]
    tok = load_tokenizer(SHIPPED / "tokenizer")
    engine = HFEngine(load_model(SHIPPED / "student", device="cpu"), tok)
    for role, prompt in (("student", format_prompt), ("student_cued", cued_prompt)):
        fresh = generate_rows(
            engine,
            tok,
            [prompt(r["prompt"]) for r in recs],
            recs,
            role=role,
            model="student",
            max_tokens=768,
        )
        stored = {r["problem_id"]: (r["style"], r["correct"]) for r in evals if r["role"] == role}
        differ = [
            f["problem_id"] for f in fresh if (f["style"], f["correct"]) != stored[f["problem_id"]]
        ]
        assert len(differ) <= 1, (role, differ)
        want = "verbose" if role == "student" else "steps"
        assert sum(f["style"] == want for f in fresh) >= len(fresh) - 1, role


def test_self_distill_teacher_reads_the_cue_of_the_students_concise_mode() -> None:
    """OPSDC's frozen teacher must read exactly the prompt the world's concise mode answers."""
    from data.prompts import cued_prompt
    from tasks.generation import chat_prompt
    from tasks.score import SelfDistillConfig
    from train.models import load_tokenizer

    tok = load_tokenizer(SHIPPED / "student")
    question = "What is 17 + 25 - 8?"
    teacher_ids = chat_prompt(tok, SelfDistillConfig().instruction.format(problem=question))
    assert teacher_ids == tok(cued_prompt(question), add_special_tokens=False)["input_ids"]

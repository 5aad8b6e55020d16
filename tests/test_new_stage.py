"""Adding a stage: one module (tests/toy_stage.py) and one registration, and the rest follows.

The toy stage ``lengths`` is registered (one line); its declaration (``runs="beside"``, reads
``sample``) puts it into the plan of every method that samples, then one tiny round of on_policy
runs through ``mpd run`` (in this process, on the session's Prefect server). Nothing else in
mpd is changed: ``mpd status`` lists the stage, its table is a SQL view with its rows,
``mpd rerun --from lengths`` accepts it and recomputes it, and a second run finds it cached.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.toy_stage
from data.catalog import run_query, views
from flows import modes
from flows.cli import build_parser, main
from flows.config import RunConfig
from tasks import registry
from tests.test_modes import TINY

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def toy_registered() -> Iterator[None]:
    registry.register(tests.toy_stage.STAGE)  # the one registration line
    try:
        yield
    finally:
        registry.unregister("lengths")


def test_the_plan_picks_the_new_stage_up_from_its_declaration(toy_registered: None) -> None:
    """Every method whose round samples runs it, after sample; off_policy (no sample) does not."""
    for method in modes.MODES:
        cfg = RunConfig.model_validate({"method": method, "sample": {"n": 4}})  # self_train: n >= 4
        plan = modes.round_stages(cfg)
        if "sample" in plan:
            assert plan.index("sample") < plan.index("lengths"), (method, plan)
        else:
            assert "lengths" not in plan, (method, plan)


def test_the_cli_names_the_new_stage_and_its_view(toy_registered: None) -> None:
    """``mpd rerun --from``'s choices and ``mpd sql``'s list of views come from the
    declarations: the toy stage and its table appear there once registered."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sql_help = sub.choices["sql"].format_help()
    assert all(view in " ".join(sql_help.split()) for view in views()), sql_help
    assert "lengths" in sql_help
    rerun = sub.choices["rerun"]
    choices = next(a.choices for a in rerun._actions if "--from" in a.option_strings)
    assert "lengths" in choices


def args(ws: Path) -> list[str]:
    sets = {**TINY, "method": "on_policy", "train.loss": "ce"}
    return ["-w", str(ws), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def states(ws: Path) -> dict[str, str]:
    stages = json.loads((ws / ".mpd" / "last_run.json").read_text())["stages"]
    return {where: o["state"] for where, o in stages.items()}


def test_a_new_stage_runs_and_shows_in_status_sql_and_rerun(
    toy_registered: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    assert main(["run", "--rounds", "1", *args(ws)]) == 0
    assert states(ws)["1/lengths"] == "done"

    # SQL: a view with the stage's rows, one per sample
    assert "lengths" in views()
    query = "select count(*) n, (select count(*) from samples) samples, min(words) w from lengths"
    (row,) = run_query(ws, query).to_pylist()
    assert row["n"] == row["samples"] > 0 and row["w"] >= 1

    # mpd status lists it, done, in the plan's order: after sample, before train
    capsys.readouterr()
    assert main(["status", *args(ws)]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if "│" in line]
    round1 = [(c[2].strip(), c[3].strip()) for c in rows if len(c) > 3 and c[1].strip() == "1"]
    names = [name for name, _ in round1]
    assert names.index("sample") < names.index("lengths") < names.index("train"), names
    assert ("lengths", "done") in round1

    # a second run reuses it; rerun --from lengths recomputes it and what follows, not sample
    assert main(["run", "--rounds", "1", *args(ws)]) == 0
    assert states(ws)["1/lengths"] == "cached"
    assert main(["rerun", "--round", "1", "--from", "lengths", *args(ws)]) == 0
    after = states(ws)
    assert after["1/lengths"] == "done" and after["1/train"] == "done"
    assert after["1/sample"] == "cached"


def test_the_toy_stage_is_gone_after_the_test() -> None:
    """Registration is explicit: the toy stage exists only where a test registers it."""
    assert "lengths" not in registry.STAGES and "lengths" not in views()

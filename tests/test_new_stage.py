"""Adding a stage: one module (tests/toy_stage.py) and one registration, and the rest follows.

The toy stage ``lengths`` is registered and put into method on_policy's plan (``Mode.extra``),
then one tiny round runs through ``mpd run`` (in this process, on the session's Prefect server).
Nothing else in mpd is changed: ``mpd status`` lists the stage, its table is a SQL view with its
rows, ``mpd rerun --from lengths`` accepts it and recomputes it, and a second run finds it cached.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.toy_stage
from data.catalog import run_query, views
from flows import modes
from flows.cli import main
from tasks import registry
from tests.test_modes import TINY

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def toy_registered() -> Iterator[None]:
    mode = modes.MODES["on_policy"]
    registry.register(tests.toy_stage.STAGE)  # the one registration line
    modes.MODES["on_policy"] = dataclasses.replace(mode, extra=("lengths",))
    try:
        yield
    finally:
        modes.MODES["on_policy"] = mode
        registry.unregister("lengths")


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

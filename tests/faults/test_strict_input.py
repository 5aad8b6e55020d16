"""Strict input, the other side: what must be accepted as meant, and a deployment's parameters.

``test_user_mistakes.py`` holds the refusals (one line, exit 2, nothing written). Here, one
table of values that used to be taken in a way the user did not mean, each checked through the
real ``mpd config show``; and the Prefect deployment's parameters (``overrides``, ``rounds``),
which reach ``campaign_flow`` without the CLI: a mistake in them ends the run Failed, in one line
that names the parameter, before the workspace is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())

# (case id, argv after `mpd config show`, {dotted key: the value it must resolve to})
ACCEPTED: list[tuple[str, list[str], dict[str, object]]] = [
    ("--set section merges key by key", ["--set", "train={lr: 5}"],
     {"train.lr": 5.0, "train.steps": TINY["train"]["steps"]}),
    ("--set section merges, another section", ["--set", "score={top_k: 8}"],
     {"score.top_k": 8, "score.context": TINY["score"]["context"]}),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "want"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_value_is_taken_as_meant(tmp_path: Path, argv: list[str], want: dict[str, object]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "show", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shown = yaml.safe_load(out.stdout)
    for key, value in want.items():
        node = shown
        for part in key.split("."):
            node = node[part]
        assert node == value, key


# (case id, campaign_flow parameters, text of the Failed state's one line)
DEPLOYMENT: list[tuple[str, dict, str]] = [
    ("overrides item named", {"overrides": ["rounds=abc"]}, "overrides item rounds=abc: 'rounds'"),
    ("overrides item inf", {"overrides": ["train.lr=.inf"]},
     "overrides item train.lr=.inf: 'train.lr': .inf is not a finite number"),
    ("rounds parameter negative", {"rounds": -1}, "rounds parameter -1: must be 0 or more"),
    ("rounds_per_night parameter zero", {"rounds_per_night": 0},
     "rounds_per_night parameter 0: must be 1 or more"),
    ("problem file checked first", {"overrides": ["problems.source=file",
                                                  "problems.file.path={files}/empty.jsonl"]},
     "empty.jsonl: no rows"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("params", "expected"), [c[1:] for c in DEPLOYMENT], ids=[c[0] for c in DEPLOYMENT]
)
def test_deployment_parameter_mistake_fails_the_run_in_one_line(
    tmp_path: Path, params: dict, expected: str
) -> None:
    """``campaign_flow``'s body, as a deployment's run executes it (no CLI before it)."""
    from flows.campaign import campaign_flow

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "empty.jsonl").write_text("")
    overrides = [o.format(files=tmp_path / "files") for o in params.get("overrides", [])]
    workspace = tmp_path / "ws"
    state = campaign_flow.fn(**{**params, "overrides": overrides}, workspace=str(workspace))
    assert state.is_failed(), state
    assert expected in state.message and "\n" not in state.message
    assert not workspace.exists(), "a refused run creates no workspace"

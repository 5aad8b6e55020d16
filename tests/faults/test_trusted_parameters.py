"""From the attacker's side: a deployment's parameters (anyone's who can start a run in the
Prefect UI) cannot make the worker run a program, send a credential elsewhere, or read a config
file of their own (flows/trusted.py). The same keys stay the owner's to set with ``--set``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import CLI, DEPLOYMENT, load_config
from flows.trusted import UntrustedParameterError, leaves, trusted
from tests.conftest import REPO


def evil_program(tmp_path: Path) -> tuple[Path, Path]:
    """A program that, if it ever ran, would leave a marker (what an attacker's would do)."""
    marker = tmp_path / "pwned"
    program = tmp_path / "evil.sh"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    return program, marker


# (case id, overrides with {evil} for the attacker's program)
ATTACKS = [
    ("vllm interpreter", ["engines.student.python={evil}"]),
    ("vllm interpreter in a section mapping", ["engines.student={kind: vllm, python: {evil}}"]),
    ("vllm interpreter of the rewriter section", ["engines={rewriter: {python: {evil}}}"]),
    ("worker environment", ["engines.teacher.env={LD_PRELOAD: {evil}}"]),
    ("vllm trust_remote_code", ["engines.student.vllm_args={trust_remote_code: true}"]),
    ("endpoint that receives the api key", ["engines.teacher.base_url=http://attacker:1/v1"]),
    ("which secret is sent", ["engines.teacher.api_key_env=AWS_SECRET_ACCESS_KEY"]),
    ("training launcher", ["train.distributed.launcher=[{evil}]"]),
    ("object store endpoint", ["storage.options={client_kwargs: {endpoint_url: http://a:1}}"]),
]


@pytest.mark.parametrize("overrides", [a[1] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_a_deployment_override_of_a_trusted_key_is_refused_and_runs_nothing(
    tmp_path: Path, overrides: list[str]
) -> None:
    """``campaign_flow``'s body as a deployment's run executes it: Failed in one line that
    names the key, no workspace, and the attacker's program never ran."""
    from flows.campaign import campaign_flow

    program, marker = evil_program(tmp_path)
    given = [o.replace("{evil}", str(program)) for o in overrides]
    workspace = tmp_path / "ws"
    state = campaign_flow.fn(overrides=given, workspace=str(workspace), rounds=1)
    assert state.is_failed(), state
    assert "never a deployment parameter's" in state.message, state.message
    assert "\n" not in state.message
    assert not workspace.exists() and not marker.exists()


@pytest.mark.parametrize("overrides", [a[1] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_the_owner_sets_the_same_keys_on_the_command_line(
    tmp_path: Path, overrides: list[str]
) -> None:
    program, _ = evil_program(tmp_path)
    given = [o.replace("{evil}", str(program)) for o in overrides]
    load_config(None, given, labels=CLI)  # no refusal: the owner's own machine


def test_untrusted_keys_stay_settable_by_a_deployment() -> None:
    cfg = load_config(
        None, ["train.lr=1e-5", "rounds=2", "engines.teacher.kind=hf"], labels=DEPLOYMENT
    )
    assert cfg.train.lr == 1e-5 and cfg.rounds == 2


def test_a_config_file_of_the_attackers_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``config`` parameter outside the clone (the worker's directory), the repository and
    the owner's listed directories is refused before it is read."""
    program, marker = evil_program(tmp_path)
    theirs = tmp_path / "theirs.yaml"
    base = REPO / "configs" / "tiny.yaml"
    theirs.write_text(
        yaml.safe_dump({"base": str(base), "engines": {"student": {"python": str(program)}}})
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MPD_DEPLOY_CONFIG_DIRS", raising=False)
    with pytest.raises(
        UntrustedParameterError,
        match=r"^config parameter .*theirs\.yaml: a deployment reads config files inside its clone",
    ):
        load_config(theirs, labels=DEPLOYMENT)
    with pytest.raises(UntrustedParameterError):  # through a link in the clone, too
        (elsewhere / "link.yaml").symlink_to(theirs)
        load_config(elsewhere / "link.yaml", labels=DEPLOYMENT)
    assert load_config(base, labels=DEPLOYMENT).rounds >= 1  # the configs mpd ships
    monkeypatch.setenv("MPD_DEPLOY_CONFIG_DIRS", str(tmp_path))  # the owner lists the folder
    assert load_config(theirs, labels=DEPLOYMENT).engines.student.python == str(program)
    assert not marker.exists()


def test_the_cli_reads_any_config_file_its_user_names(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "tiny.yaml"), "rounds": 5}))
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "show", "-c", str(mine)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["rounds"] == 5, out.stderr


def test_which_keys_are_trusted() -> None:
    assert trusted(("engines", "student", "python")) == "engines.*.python"
    assert trusted(("engines", "rewriter", "env", "LD_PRELOAD")) == "engines.*.env"
    assert trusted(("storage", "options", "client_kwargs", "endpoint_url")) == "storage.options"
    assert trusted(("engines", "student", "kind")) is None
    assert trusted(("train", "lr")) is None and trusted(("engines",)) is None
    assert leaves({"a": {"b": 1, "c": {}}, "d": [1]}) == {
        ("a", "b"): 1,
        ("a", "c"): {},
        ("d",): [1],
    }


def test_mpd_serve_refuses_at_once_what_its_runs_would_refuse(tmp_path: Path) -> None:
    """``mpd serve --set`` becomes the served deployment's ``overrides``, which anyone may edit
    per run: a trusted key there is refused before anything is registered."""
    program, marker = evil_program(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--set", f"engines.student.python={program}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("mpd: error: --set (a deployment parameter) engines.student.python:")
    assert not marker.exists()

"""Scheduling as an operator sets it up: prefect.yaml deployed to a real server, run by a worker.

The end-to-end test runs the README's commands against the session's ``prefect
server start`` (fixture ``prefect_api``): create the ``process`` pool, ``prefect
deploy --all`` from prefect.yaml, start a worker, trigger the nightly deployment
with a tiny config and watch it to completion, then check that the night reached
"rounds committed + rounds_per_night" in the workspace. ``mpd serve`` is checked
without blocking: its schedule and parameters go through ``to_deployment``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import UserError
from flows.serve import NIGHTLY, committed_rounds, rounds_to_reach, serve_options
from tests.conftest import stop_process_tree

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[1]
POOL = "mpd"  # the work pool prefect.yaml names
# One round in seconds: 4 problems x 2 samples, 32-token generations, 2 training steps,
# 4 test problems evaluated. The filter keeps every rewrite (KEEP_ALL): with 32 tokens most
# rewrites are truncated, and this test is about scheduling, not about what a round keeps.
TINY_NIGHT = [
    "problems.n_train=40",
    "problems.n_test=10",
    "problems.n_heldout=5",
    "evaluate.splits=[test]",
    "sample.problems_per_round=4",
    "sample.max_tokens=32",
    "rewrite.max_tokens=32",
    "score.context=rewrite",
    "train.steps=2",
    "train.batch_size=2",
    "evaluate.limit=4",
    "evaluate.max_tokens=32",
]
KEEP_ALL = """
SELECT round, problem_id, sample_idx, true AS kept, 'kept' AS reason, think_tokens,
       orig_think_tokens, think_tokens::DOUBLE / greatest(orig_think_tokens, 1) AS ratio
FROM rewrites
"""


def prefect(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The ``prefect`` CLI from the repository root, never prompting (as in cron or CI)."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def mpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def test_serve_help_names_the_schedule_options() -> None:
    out = mpd("serve", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--rounds-per-night", "--cron", "--timezone", "--config", "--set"):
        assert option in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timezone", "Mars/Olympus"], "Invalid timezone"),
        (["--cron", "0 25 * * *"], "Invalid cron string"),
        (["--rounds-per-night", "0"], "must be at least 1"),
        (["--set", "train.lrr=1"], "unknown key 'train.lrr'"),
    ],
)
def test_serve_refuses_a_bad_schedule_in_one_line(args: list[str], message: str) -> None:
    out = mpd("serve", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_serve_builds_the_nightly_deployment() -> None:
    """What ``mpd serve`` serves, built with ``to_deployment`` (no runner, nothing blocks)."""
    from flows.campaign import campaign_flow

    options = serve_options(
        config="configs/tiny.yaml",
        rounds_per_night=2,
        timezone="Europe/Paris",
        overrides=["train.lr=1e-4"],
    )
    dep = campaign_flow.to_deployment(**options)
    assert dep.name == NIGHTLY and dep.flow_name == "mpd-campaign"
    assert dep.entrypoint.endswith("flows/campaign.py:campaign_flow")
    [schedule] = dep.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/Paris"
    assert dep.parameters == {
        "config": "configs/tiny.yaml",
        "rounds_per_night": 2,
        "overrides": ["train.lr=1e-4"],
    }
    # Deployed parameters are validated against the flow's signature by the API.
    assert "rounds_per_night" in dep._parameter_openapi_schema.properties


def test_in_process_flows_use_the_session_server(prefect_api: str) -> None:
    """The fixture reaches flows run in the test process too, not only subprocesses."""
    import urllib.request

    from prefect import flow
    from prefect.context import FlowRunContext

    @flow
    def which_run() -> str:
        return str(FlowRunContext.get().flow_run.id)

    run_id = which_run()
    with urllib.request.urlopen(f"{prefect_api}/flow_runs/{run_id}", timeout=10) as resp:
        assert json.load(resp)["state"]["type"] == "COMPLETED"


def test_an_empty_workspace_has_no_committed_rounds(tmp_path: Path) -> None:
    assert committed_rounds(tmp_path) == 0
    assert rounds_to_reach(tmp_path, 1) == 1
    assert rounds_to_reach(tmp_path, 3, cap=2) == 2
    with pytest.raises(UserError, match="at least 1"):  # one line and exit 2 from the CLI
        rounds_to_reach(tmp_path, 0)


@pytest.mark.slow
def test_nightly_deployment_runs_on_a_worker(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    keep_all = tmp_path / "keep_all.sql"
    keep_all.write_text(KEEP_ALL)
    overrides = [*TINY_NIGHT, f"filter.sql={keep_all}"]

    pool = prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:  # started first: it boots while we deploy
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=tmp_path,  # the pull step, not the worker's directory, decides where runs run
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployed = prefect("deploy", "--all")
        assert deployed.returncode == 0, _explain_deploy_failure(deployed)
        _check_nightly_deployment()
        run = prefect(
            "deployment",
            "run",
            f"mpd-campaign/{NIGHTLY}",
            "--param",
            f"workspace={json.dumps(str(ws))}",
            "--param",
            f"overrides={json.dumps(overrides)}",
            "--watch",
            "--watch-timeout",
            "240",
            timeout=300,
        )
        detail = run.stdout[-3000:] + run.stderr[-3000:] + _tail(worker_log)
        assert run.returncode == 0, detail
        assert "Completed" in run.stdout, detail
    finally:
        stop_process_tree(worker)

    # The night reached committed (0) + rounds_per_night (1), and the next one goes on.
    assert (ws / "eval" / "round=1" / "_manifest.json").is_file()
    assert (ws / "train" / "round=1" / "model").is_dir()
    assert committed_rounds(ws) == 1
    assert rounds_to_reach(ws, 1) == 2
    assert rounds_to_reach(ws, 2, cap=1) == 1
    # A gap stops the count: a round 3 without a round 2 is not "3 rounds committed".
    shutil.copytree(ws / "eval" / "round=1", ws / "eval" / "round=3")
    assert committed_rounds(ws) == 1


def _check_nightly_deployment() -> None:
    """What prefect.yaml declared is what the server holds: pool, parameters, cron, clone path."""
    info = prefect("deployment", "inspect", f"mpd-campaign/{NIGHTLY}", "--output", "json")
    assert info.returncode == 0, info.stderr
    dep = json.loads(info.stdout)
    assert dep["work_pool_name"] == POOL
    assert dep["parameters"] == {"config": "configs/tiny.yaml", "rounds_per_night": 1}
    [schedule] = dep["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    # The pull step names this clone, wherever it is: the build step recorded `pwd`.
    [step] = dep["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)


def _tail(path: Path, chars: int = 3000) -> str:
    return "\n--- worker log ---\n" + path.read_text(errors="replace")[-chars:]


def _explain_deploy_failure(out: subprocess.CompletedProcess[str]) -> str:
    """The deploy output, with the known cause named when it is the FastAPI one."""
    text = out.stdout[-3000:] + out.stderr[-3000:]
    if "workers/filter" in text and "valid integer" in text:
        import fastapi

        text += (
            f"\n\nfastapi {fastapi.__version__} rejects the null offset/limit that Prefect "
            "3.8's client sends after creating each deployment (FastAPI >= 0.151 no longer "
            "treats an explicit null as a missing Body parameter), so `prefect deploy` stops "
            "after the first deployment. Install fastapi<0.151 (see pyproject.toml)."
        )
    return text

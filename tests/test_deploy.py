"""Scheduling as an operator sets it up: prefect.yaml deployed to a real server, run by a worker.

The end-to-end test runs the documented commands against Prefect on PostgreSQL:
``scripts/prefect-postgres.sh start`` (a PostgreSQL cluster, a ``prefect server`` keeping its
state there, the ``process`` pool and a worker), then ``prefect deploy --all`` from prefect.yaml,
triggers the nightly deployment with a tiny config and watches it to completion, checks that
the night reached "rounds committed + rounds_per_night" in the workspace and that the run is a
row of PostgreSQL's ``flow_run`` table, and stops everything it started. The other tests use the
session's server (fixture ``prefect_api``). ``mpd serve`` is checked without blocking: its
schedule and parameters go through ``to_deployment``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data.errors import UserError
from flows.nightly import committed_rounds, rounds_to_reach
from flows.serve import NIGHTLY, serve_options
from tests.conftest import free_port

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prefect-postgres.sh"
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


@pytest.fixture(scope="module")
def postgres_prefect() -> Iterator[dict[str, str]]:
    """``scripts/prefect-postgres.sh start`` in a fresh directory, on free ports; stopped after.

    The directory is outside pytest's (mode 700) temporary tree: PostgreSQL runs as the
    ``postgres`` user, which must reach it. A stack that cannot start fails the test (CI has
    PostgreSQL 15); it never skips.
    """
    services = Path(tempfile.mkdtemp(prefix="mpd-services-"))
    services.chmod(0o755)
    env = {
        **os.environ,
        "MPD_SERVICES_DIR": str(services),
        "PG_PORT": str(free_port()),
        "PREFECT_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker picks the run up within seconds
    }
    env.pop("PREFECT_API_URL", None)

    def script(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), action],
            env=env,
            cwd=services,
            capture_output=True,
            text=True,
            timeout=300,
        )

    started = script("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {
            "api": f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
            "pg_port": env["PG_PORT"],
            "dir": str(services),
        }
    finally:
        stopped, status = script("stop"), script("status")
        shutil.rmtree(services, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert status.stdout.split("\n")[:3] == [
        "postgres: stopped",
        "prefect server: stopped",
        "worker: stopped",
    ], status.stdout


@pytest.mark.slow
def test_nightly_deployment_runs_on_a_worker_against_postgres(
    tmp_path: Path, postgres_prefect: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", postgres_prefect["api"])  # the prefect CLI's server
    ws = tmp_path / "ws"
    keep_all = tmp_path / "keep_all.sql"
    keep_all.write_text(KEEP_ALL)
    overrides = [*TINY_NIGHT, f"filter.sql={keep_all}"]

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
    worker_log = Path(postgres_prefect["dir"]) / "worker.log"
    detail = run.stdout[-3000:] + run.stderr[-3000:] + _tail(worker_log)
    assert run.returncode == 0, detail
    assert "Completed" in run.stdout, detail

    # The server kept the run in PostgreSQL: the deployment's flow run, completed.
    query = "select state_type from flow_run where deployment_id is not null"
    psql = ["psql", "-h", "127.0.0.1", "-p", postgres_prefect["pg_port"], "-U", "postgres"]
    rows = subprocess.run(
        [*psql, "-d", "prefect", "-Atc", query], capture_output=True, text=True, timeout=30
    )
    assert rows.stdout.split() == ["COMPLETED"], rows.stdout + rows.stderr

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

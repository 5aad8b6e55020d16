"""A run on a saturated machine completes (no surprises: a busy night is no excuse).

At a load average of 9-10 on two cores, `mpd run`s used to die before doing anything with
"Timed out while attempting to connect to ephemeral Prefect API server" and a traceback:
Prefect waits 20 s for its local API server by default. mpd waits longer, retries once, and
then says so in one line (flows/prefect_env.py). This test runs against that real local server
(the run's own, flows/prefect_server.py: no session server, no timeout set by the test suite)
while eight busy loops, which stop on their own, hold both cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, stop_process_tree

LOAD_S = 120  # the busy loops end by themselves even if the test is killed
BUSY = f"import time\nend = time.time() + {LOAD_S}\nwhile time.time() < end: pass\n"
SMALL = [
    "--set", "problems.n_train=40", "--set", "problems.n_test=10", "--set", "problems.n_heldout=5",
    "--set", "rounds=0", "--set", "evaluate.limit=2", "--set", "evaluate.max_tokens=8",
]  # fmt: skip


def test_run_completes_while_the_machine_is_saturated(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # mpd's default applies
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path / "prefect" / "storage")
    loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(8)]
    try:
        time.sleep(3)  # the load is on before the run starts
        assert all(proc.poll() is None for proc in loops)
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "-w", str(tmp_path / "ws"), *SMALL],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
    finally:
        for proc in loops:
            stop_process_tree(proc, timeout=5)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert (tmp_path / "ws" / "eval" / "round=0" / "_manifest.json").is_file()

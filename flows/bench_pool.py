"""Bench campaigns side by side: ``bench.jobs`` at a time, each an ``mpd run`` process of its own.

The bench's campaigns are independent but for the stages they share (round 0's evaluation and
round 1's sample, rewrite, score and filter of a seed), which the first campaign of each seed
computes and the others read from it (``cache_from``). One campaign at a time leaves a core idle:
a tiny model's step gains nothing from a second torch thread (``make bench`` runs with
``OMP_NUM_THREADS=1``), so the 24 campaigns of the default bench took two hours on 2 cores
serially. Here a seed's first campaign runs before the rest of its seed (they would otherwise
compute its shared stages again, side by side), the first campaigns of the next seeds go first
(they unlock the most work), and up to ``jobs`` run at once.

Each campaign is a process (``python -m flows.cli run``), not a thread: torch's random state, the
log handlers and Prefect's contexts are per process, so a campaign computes the same rows
whichever campaign runs beside it (its stages' keys and seeds are its own), and the bench
can run on any mix of jobs. Each writes its log beside its workspace (``<method>/seed=0.log``)
and reports to the bench's Prefect API. It runs in a session of its own, told to stop when the
bench's process ends (``PR_SET_PDEATHSIG``: SIGTERM, so it stops as ``mpd run`` does, in
seconds), and a stop signal to the bench is passed on to every campaign at once
(:func:`flows.stopping.on_stop`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from data.errors import InternalError
from flows import stopping

if TYPE_CHECKING:
    from flows.bench import Member

log = logging.getLogger("mpd")

POLL_S = 0.5
STOP_WAIT_S = 4.0  # within flows.stopping's DEADLINE_S: a campaign stops in 1-3 s
ERROR_PREFIX = "mpd: error: "  # the one line `mpd` prints for a user or resource failure


def order(seeds: Sequence[int], done: set[int], started: set[int]) -> list[int]:
    """The plan indices (into ``seeds``, each member's seed) ready to start, best first.

    A seed's first member (its leader: it computes the stages its seed shares) is ready at
    once; any other member once its leader has finished. Leaders come first, then plan order.
    """
    leader: dict[int, int] = {}
    for i, s in enumerate(seeds):
        leader.setdefault(s, i)
    ready = [
        i for i, s in enumerate(seeds) if i not in started and (leader[s] == i or leader[s] in done)
    ]
    return sorted(ready, key=lambda i: (leader[seeds[i]] != i, i))


def member_log(m: Member) -> Path:
    """Where a member's process writes its output: beside its workspace (``seed=0.log``)."""
    return m.workspace.with_name(m.workspace.name + ".log")


def command(m: Member, config: str) -> list[str]:
    """The member's ``mpd run``: its config, workspace and every ``--set`` of its plan."""
    sets = [a for s in m.overrides for a in ("--set", s)]
    return [sys.executable, "-m", "flows.cli", "run", "-c", config, "-w", str(m.workspace), *sets]


def child_env(jobs: int) -> dict[str, str]:
    """The bench's environment, with its Prefect API, and each process's share of the cores
    where the user set no thread count."""
    from prefect.settings import get_current_settings

    env = dict(os.environ)
    url = get_current_settings().api.url
    if url:  # the bench's own server, or the one it was pointed at: one API for every campaign
        env["PREFECT_API_URL"] = str(url)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def _die_with_parent(parent: int) -> Callable[[], None]:
    """In the child, before exec: SIGTERM when the bench's process (pid ``parent``) ends,
    however it ends; a child whose parent ended before the request exits at once (as
    ``train.launch.die_with_parent`` does for the training processes, with SIGKILL)."""

    def tie() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            pr_set_pdeathsig = 1  # <linux/prctl.h>
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(1)

    return tie


@dataclass
class Running:
    """A campaign under way: its member, progress label, process and open log."""

    member: Member
    where: str
    proc: subprocess.Popen[bytes]
    out: IO[bytes]


def outcome(r: Running) -> str | None:
    """None for a campaign that ended well; the reason for one that failed (the one line ``mpd``
    printed). A failure that printed no such line (a traceback: a bug, or killed from outside)
    raises, naming the log."""
    if r.proc.returncode == 0:
        return None
    text = member_log(r.member).read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith(ERROR_PREFIX)]
    if lines and r.proc.returncode in (1, 2):
        return lines[-1][len(ERROR_PREFIX) :]
    tail = "\n".join(text.splitlines()[-15:])
    raise InternalError(
        f"{r.where} ended with exit code {r.proc.returncode} and no error line "
        f"(its log: {member_log(r.member)}):\n{tail}"
    )


def run_side_by_side(
    members: list[Member],
    config: str,
    label: str,
    where_of: Callable[[int, Member], str],
    after: Callable[[Member, str], None],
    jobs: int,
) -> dict[str, str]:
    """Every member's campaign, ``jobs`` at a time (:func:`order`); ``after`` logs each one's
    progress line as it ends. Failures as :func:`flows.bench.run_campaigns` returns them."""
    env = child_env(jobs)
    seeds = [m.seed for m in members]
    done: set[int] = set()
    running: dict[int, Running] = {}
    failures: dict[str, str] = {}

    def stop_all(wait_s: float = STOP_WAIT_S) -> None:
        """Tell every running campaign to stop, and wait for them (briefly: the bench's own stop
        has a deadline), so that they end before the bench does and its end (PR_SET_PDEATHSIG)
        does not interrupt their own stop."""
        for r in list(running.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        for r in list(running.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))

    stopping.on_stop(stop_all)
    try:
        while len(done) < len(members):
            for i in order(seeds, done, set(running) | done)[: jobs - len(running)]:
                m = members[i]
                where = where_of(i, m)
                m.workspace.parent.mkdir(parents=True, exist_ok=True)
                out = open(member_log(m), "wb")  # noqa: SIM115 (closed when the process ends)
                proc = subprocess.Popen(
                    command(m, config),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the bench, which stops it
                    preexec_fn=_die_with_parent(os.getpid()),
                )
                running[i] = Running(m, where, proc, out)
                log.info(
                    "%s: %d round(s) in %s (process %d, log %s)",
                    where,
                    m.cfg.rounds,
                    m.workspace,
                    proc.pid,
                    member_log(m),
                )
            time.sleep(POLL_S)
            for i, r in list(running.items()):
                if r.proc.poll() is None:
                    continue
                del running[i]
                r.out.close()
                done.add(i)
                reason = outcome(r)
                if reason is not None:
                    failures[r.where.split("] ", 1)[1]] = reason
                    log.error("%s failed: %s (log: %s)", r.where, reason, member_log(r.member))
                after(r.member, r.where)
    finally:  # a bug raised, or an exception unwinding the bench: no campaign outlives it
        stopping.off_stop(stop_all)
        stop_all(wait_s=15.0)
        for r in running.values():
            r.out.close()
    return failures

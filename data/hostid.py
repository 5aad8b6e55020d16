"""Which machine, and which boot of it, a lease holder runs on.

A host *name* says nothing: containers started from one image often share it, and two
machines named ``worker`` would each read the other's live lease as their own process that
no longer exists. What tells a process of this very kernel apart is the machine id
(``/etc/machine-id``), the boot id (``/proc/sys/kernel/random/boot_id``: a new one at every
boot, so a pid recorded before a reboot is never checked against the processes after it) and
the pid namespace (containers on one kernel can share both ids, yet see other pids). Only when
all three match may a lease holder's pid be looked up here (:func:`same_host`).
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path
from typing import Any

# Tests only: "<machine id>/<boot id>" stands for this process's host ids, so one machine can
# play two hosts that share a host name (tests/test_fencing.py). Never set in a real run.
FAKE_HOST_ENV = "MPD_TEST_FAKE_HOST_ID"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:  # no /etc/machine-id (a minimal container), no /proc: unknown
        return ""


@cache
def _real_ids() -> tuple[str, str, str]:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return _read("/etc/machine-id"), _read("/proc/sys/kernel/random/boot_id"), pid_ns


def identity() -> dict[str, str]:
    """This process's host identity, as a lease records it (host name for messages only)."""
    machine, boot, pid_ns = _real_ids()
    if fake := os.environ.get(FAKE_HOST_ENV):
        machine, _, boot = fake.partition("/")
    return {"host": socket.gethostname(), "machine_id": machine, "boot_id": boot, "pid_ns": pid_ns}


def same_host(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` (a lease record) ran on this machine, this boot, this pid namespace:
    the only case in which its pid means a process this one can look up. Unknown ids (a record
    written before ids were recorded, a machine without them) never match."""
    mine = identity()
    keys = ("machine_id", "boot_id", "pid_ns")
    return all(mine[k] and holder.get(k) == mine[k] for k in keys)


def describe_host(holder: dict[str, Any]) -> str:
    """``name`` (machine ``abcd1234``, boot ``ef56``): the name alone can be shared."""
    name = holder.get("host") or "an unknown host"
    machine, boot = str(holder.get("machine_id") or ""), str(holder.get("boot_id") or "")
    if not machine:
        return str(name)
    return f"{name} (machine {machine[:8]}, boot {boot[:8] or '?'})"

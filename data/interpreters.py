"""Library versions of another Python interpreter (vLLM's own environment), asked once.

A stage computed by vLLM is shaped by the vLLM, torch and transformers of the interpreter that
runs the worker, never by this process's (where vLLM is not even installed). That interpreter
is asked with a tiny script (``importlib.metadata`` only: nothing is imported, a second at
most), and the answer is cached in ``<cache>/interpreters/`` beside what it was asked under::

    {"python": "/opt/vllm/bin/python", "mtime_ns": 1733…, "dists": ["torch", "vllm", …],
     "sites": {"/opt/vllm/lib/python3.12/site-packages": 1733…}, "versions": {"vllm": "0.11.0", …}}

The interpreter's own mtime alone would not do: ``pip install -U vllm`` in a virtual
environment leaves its ``bin/python`` (a link to the base interpreter) untouched. An upgrade
renames the package's ``*.dist-info`` directory, which changes its site directory's mtime, so
the entry is trusted only while the interpreter and every site directory it reported keep
their mtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from data.digests import read_entry, write_entry
from data.errors import TransientError, UserError

ASK = """
import importlib.metadata as m, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = "absent"
sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print(json.dumps({"versions": out, "sites": sites}))
"""

ASK_TIMEOUT_S = 120  # a second is typical; a cold disk under load can take far longer


class InterpreterError(UserError):
    """An interpreter a stage computes with cannot be asked its library versions."""


class InterpreterTimeoutError(TransientError):
    """The interpreter was asked its library versions and did not answer in time."""


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def interpreter_versions(
    python: Path | str, dists: tuple[str, ...], cache: Path | None = None
) -> dict[str, str]:
    """``dists``' versions in the interpreter ``python`` ("absent" where not installed)."""
    python = str(python)
    mtime = _mtime(python)
    if mtime is None:
        raise InterpreterError(f"no Python interpreter at {python}")
    name = hashlib.sha256(python.encode()).hexdigest()[:32]
    where = cache / "interpreters" / f"{name}.json" if cache is not None else None
    entry = read_entry(where) if where is not None else None
    if (
        entry
        and entry.get("python") == python
        and entry.get("mtime_ns") == mtime
        and entry.get("dists") == sorted(dists)
        and all(_mtime(site) == t for site, t in (entry.get("sites") or {}).items())
    ):
        return dict(entry["versions"])
    answer = _ask(python, sorted(dists))
    sites = {site: t for site in answer["sites"] if (t := _mtime(site)) is not None}
    if where is not None:
        entry = {"python": python, "mtime_ns": mtime, "dists": sorted(dists), "sites": sites}
        write_entry(where, {**entry, "versions": answer["versions"]})
    return dict(answer["versions"])


def _ask(python: str, dists: list[str]) -> dict:
    try:
        proc = subprocess.run(
            [python, "-c", ASK, json.dumps(dists)],
            capture_output=True,
            text=True,
            timeout=ASK_TIMEOUT_S,
            # the environment a vLLM worker gets: ours, minus paths meant for our interpreter
            env={k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}},
        )
    except OSError as exc:  # not executable, not a program: the config names a wrong file
        raise InterpreterError(f"cannot run {python} to read its library versions: {exc}") from None
    except subprocess.TimeoutExpired:  # a loaded machine, a slow disk: transient, exit 1
        raise InterpreterTimeoutError(
            f"{python} did not report its library versions within {ASK_TIMEOUT_S} s"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not (
        isinstance(answer, dict)
        and isinstance(answer.get("versions"), dict)
        and isinstance(answer.get("sites"), list)
    ):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise InterpreterError(
            f"{python} did not report its library versions (exit {proc.returncode}: {last})"
        )
    return answer

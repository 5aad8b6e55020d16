"""What a Prefect deployment's parameters may not change: the keys that run a program, say
where a secret is sent, or reach the machine's environment.

A deployment's ``overrides`` and ``config`` parameters are anyone's to set who can start a run
in the Prefect UI (or its API), and the run executes on the worker with the worker owner's
files, credentials and environment. Most keys only shape what is computed (a learning rate, a
prompt, a problem file that is read as data); the keys below decide what is *executed* or where
*credentials* go, so they are the config file's alone, the file the worker's owner wrote:

- ``engines.<role>.python``: the interpreter the vLLM worker starts;
- ``engines.<role>.env``: that worker's environment (``LD_PRELOAD`` is a program too);
- ``engines.<role>.vllm_args``: ``vllm.LLM``'s keyword arguments (``trust_remote_code`` runs the
  model directory's code);
- ``engines.<role>.base_url`` and ``engines.<role>.api_key_env``: where requests go and which
  environment variable's value they carry as a bearer token (redirect one and the key is
  sent to the other's server);
- ``train.distributed.launcher``: the command that starts the training processes;
- ``storage.options``: the object store's client options (its endpoint receives the signed
  requests; a credential given there would be sent there).

And the ``config`` parameter must name a file inside the deployment's clone (the directory its
worker runs in, or the repository mpd runs from) or a directory its owner lists in
``MPD_DEPLOY_CONFIG_DIRS``: a file anywhere
else could be one the person starting the run wrote.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.errors import UserError

TRUSTED_KEYS = (
    "engines.*.python",
    "engines.*.env",
    "engines.*.vllm_args",
    "engines.*.base_url",
    "engines.*.api_key_env",
    "train.distributed.launcher",
    "storage.options",
)


_OWNERS_RUN = False  # set by `mpd run` in its own process (flows/commands.py), never by Prefect


@contextlib.contextmanager
def owners_run() -> Iterator[None]:
    """Mark the flow runs this process starts in the block as its owner's (``mpd run``: the
    ``--set`` items are the command line's). A flow parameter could not say so: whoever starts
    a deployment's run sets its parameters; a deployment's run executes in the worker's own
    process, where this flag is never set."""
    global _OWNERS_RUN
    before, _OWNERS_RUN = _OWNERS_RUN, True
    try:
        yield
    finally:
        _OWNERS_RUN = before


def is_owners_run() -> bool:
    return _OWNERS_RUN


class UntrustedParameterError(UserError):
    """A deployment parameter tried to set what only the worker's config file may."""


def leaves(data: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of a nested mapping by its key path (a list, a scalar or an empty mapping is
    a leaf)."""
    if isinstance(data, dict) and data:
        out: dict[tuple[str, ...], Any] = {}
        for key, value in data.items():
            out.update(leaves(value, (*prefix, str(key))))
        return out
    return {prefix: data}


def trusted(path: tuple[str, ...]) -> str | None:
    """The trusted key ``path`` is (or lies under), or None."""
    for i in range(1, len(path) + 1):
        dotted = ".".join(path[:i])
        for pattern in TRUSTED_KEYS:
            if pattern.count(".") == i - 1 and fnmatch.fnmatchcase(dotted, pattern):
                return pattern
    return None


def check_overrides(before: dict[str, Any], after: dict[str, Any], label: str) -> None:
    """Refuse, in one line, a change ``after`` makes to a trusted key of ``before`` (the config
    file as read): whichever way it was spelled (``a.b.c=x`` or a mapping for a section)."""
    old, new = leaves(before), leaves(after)
    for path in sorted(old.keys() | new.keys()):
        if old.get(path, _ABSENT) == new.get(path, _ABSENT):
            continue
        if (pattern := trusted(path)) is not None:
            raise UntrustedParameterError(
                f"{label} {'.'.join(path)}: {pattern} is the worker's config file's to set, "
                "never a deployment parameter's (it runs a program or says where credentials "
                "go); set it in the config file the deployment names"
            )


_ABSENT = object()
REPO = Path(__file__).resolve().parents[1]  # the configs mpd ships (configs/tiny.yaml, ...)


def check_config_path(path: Path, label: str = "config parameter") -> None:
    """Refuse a deployment's config file outside its clone and the owner's listed directories."""
    where = path.resolve()
    roots = [Path.cwd().resolve(), REPO]
    roots += [
        Path(p).resolve() for p in os.environ.get("MPD_DEPLOY_CONFIG_DIRS", "").split(":") if p
    ]
    if not any(where.is_relative_to(root) for root in roots):
        raise UntrustedParameterError(
            f"{label} {path}: a deployment reads config files inside its clone ({roots[0]}) "
            "or a directory its worker's owner lists in MPD_DEPLOY_CONFIG_DIRS; put the file "
            "there"
        )

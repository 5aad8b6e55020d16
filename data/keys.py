"""Stage keys: what makes two stage runs "the same computation".

A key is the sha256 of a canonical JSON document holding the stage's own
config, the keys of the stage runs it reads, the identity of the models it uses,
the seed, and a code version. It deliberately holds nothing run-specific (no
run id, no timestamp, no workspace path): Prefect's default cache policy hashes
the flow run id, which would recompute every stage every night.

Change one knob and only the keys that (transitively) contain it change: the
filter ratio is in the filter's config, the filter's key is in train's inputs,
train's key names the next round's student, and so on; sample and rewrite do
not read the filter, so their keys are untouched.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

_MODEL_DIGESTS: dict[tuple[str, int, int], str] = {}


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot hash {type(obj).__name__} in a stage key")


def stage_key(
    stage: str,
    *,
    config: Any,
    inputs: dict[str, str] | None = None,
    models: dict[str, str] | None = None,
    seed: int | None = None,
    code: str = "",
) -> str:
    """The stage key (64 hex digits) of one stage run."""
    doc = {
        "stage": stage,
        "config": config,
        "inputs": inputs or {},
        "models": models or {},
        "seed": seed,
        "code": code,
    }
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version("mpd")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_CODE_VERSIONS: dict[tuple[str, ...], str] = {}


def code_version(*modules: ModuleType) -> str:
    """Package version plus a digest of the given modules' source.

    Editing a stage's code (not only bumping the version) invalidates its
    cache: during development the version rarely moves, but the source does.
    Memoised per process, because a key must name the code that runs: a file
    edited under a long run (a bench, a served schedule) would otherwise change
    the keys halfway through, while the process still runs what it imported.
    """
    names = tuple(m.__name__ for m in modules)
    if names not in _CODE_VERSIONS:
        h = hashlib.sha256()
        for module in modules:
            h.update(inspect.getsource(module).encode())
        _CODE_VERSIONS[names] = f"{package_version()}+{h.hexdigest()[:12]}"
    return _CODE_VERSIONS[names]


def directory_digest(path: Path) -> str:
    """Digest of a model directory's files (names and contents).

    Memoised on (path, size, mtime) within the process: a multi-GB checkpoint
    is hashed once per run, not once per stage that reads it.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        st = file.stat()
        memo = (str(file.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _MODEL_DIGESTS:
            fh = hashlib.sha256()
            with open(file, "rb") as stream:
                while block := stream.read(1 << 20):
                    fh.update(block)
            _MODEL_DIGESTS[memo] = fh.hexdigest()
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        h.update(f"{rel}\0{_MODEL_DIGESTS[memo]}\n".encode())
    return h.hexdigest()

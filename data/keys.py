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

import ast
import hashlib
import importlib.metadata
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

# Top-level packages of this project: imports of these are followed, everything else is a library.
PACKAGES = ("data", "engines", "flows", "tasks", "train")
# Libraries whose version can change a stage's output (numerics, tokenisation, SQL, grading).
# vllm counts where it is installed in this interpreter; its own interpreter's is in the engine.
LIBRARIES = ("torch", "transformers", "tokenizers", "vllm", "duckdb", "pyarrow", "math-verify")


_ROOT = Path(__file__).resolve().parents[1]  # the directory holding this project's packages


def _module_file(name: str) -> Path | None:
    """The source file of one of this project's modules, found without importing it."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = _ROOT.joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _imported(name: str, file: Path) -> set[str]:
    """This package's modules that ``file`` imports anywhere (function bodies included)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = set()
    for candidate in found:
        # `from a.b import c` names a module only if c is one; otherwise a is followed through b.
        parts = candidate.split(".")
        while parts and parts[0] in PACKAGES:
            if _module_file(".".join(parts)):
                modules.add(".".join(parts))
                break
            parts = parts[:-1]
    return modules


def module_closure(*names: str) -> dict[str, Path]:
    """Each named module of this package and every one of its modules they import, transitively.

    Read from the source (every ``import``, at any depth of the file), not from what happens to be
    imported in this process: a stage's key must cover the trainer, the losses, the engines and the
    grader it reaches, whether or not they were loaded yet.
    """
    seen: dict[str, Path] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or (file := _module_file(name)) is None:
            continue
        seen[name] = file
        todo.extend(_imported(name, file))
        if "." in name:  # a package's __init__ runs before any of its modules
            todo.append(name.rpartition(".")[0])
    return dict(sorted(seen.items()))


def library_versions() -> dict[str, str]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = "absent"
    return versions


def code_version(*modules: ModuleType | str) -> str:
    """Package version plus a digest of the code a stage runs.

    The digest covers the given modules' source and that of every module of this package they
    import, transitively, plus the versions of the libraries that shape outputs (``LIBRARIES``):
    change the loss, the grader or an engine and exactly the stages that reach it recompute.
    Memoised per process, because a key must name the code that runs: a file edited under a
    long run (a bench, a served schedule) would otherwise change the keys halfway through,
    while the process still runs what it imported. A stage's wiring lives in its own module
    (``tasks/<stage>.py``), so one closure covers wiring, body and everything they call; the
    registry that imports every stage is imported by no stage.
    """
    names = tuple(m if isinstance(m, str) else m.__name__ for m in modules)
    memo = names
    if memo not in _CODE_VERSIONS:
        files = module_closure(*names)
        h = hashlib.sha256()
        for name, file in sorted(files.items()):
            h.update(f"{name}\0".encode() + file.read_bytes() + b"\0")
        h.update(canonical_json(library_versions()).encode())
        _CODE_VERSIONS[memo] = f"{package_version()}+{h.hexdigest()[:12]}"
    return _CODE_VERSIONS[memo]


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

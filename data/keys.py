"""Stage keys: what makes two stage runs "the same computation".

A key is the sha256 of a canonical JSON document holding everything that shapes the stage's
output and nothing else (``tasks/stagekey.py`` builds it from the stage's declaration): the
config it reads, the keys of the stage runs it reads, the identity of the models it uses and
the settings of their engines, its input files by content, a code version, and the versions of
the libraries of the interpreters that compute it. It deliberately holds nothing run-specific
(no run id, no timestamp, no workspace path): Prefect's default cache policy hashes the flow
run id, which would recompute every stage every night.

This module holds the parts that know nothing of stages: the canonical JSON, the code closure
of a module (read from the source, following subprocess entry files), and library versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def stage_key(doc: dict[str, Any]) -> str:
    """The stage key (64 hex digits) of a key document."""
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version("mpd")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# Top-level packages of this project: imports of these are followed, everything else is a library.
PACKAGES = ("data", "engines", "flows", "tasks", "train", "world")

# Libraries whose version can change a stage's output (numerics, tokenisation, SQL, grading), by
# the name a module imports -> the distributions that import brings into the computation (its
# own, and those it computes with: transformers tokenizes with tokenizers, math-verify parses
# with sympy, vLLM runs torch and transformers). A stage's key holds the versions of exactly the
# libraries its code closure imports (``closure_libraries``). Orchestration (prefect, dask,
# rich, httpx) shapes no row and is in no key.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers", "tokenizers", "safetensors"),
    "tokenizers": ("tokenizers",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "reasoning_gym": ("reasoning-gym",),
    "duckdb": ("duckdb",),
    "pyarrow": ("pyarrow",),
    "numpy": ("numpy",),
    "math_verify": ("math-verify", "sympy"),
    "sympy": ("sympy",),
    "vllm": ("vllm", "torch", "transformers", "tokenizers"),
}

# The directory holding this project's packages (tests point it at an edited copy).
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModuleInfo:
    """What one of our source files says about its dependencies, read from its AST."""

    modules: frozenset[str]  # this project's modules it imports, anywhere in the file
    libraries: frozenset[str]  # top-level names of the third-party modules it imports
    starts: frozenset[str]  # modules it starts as subprocesses by file path (its ``STARTS``)


_INFO: dict[tuple[str, int, int], ModuleInfo] = {}


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of one of this project's modules, found without importing it."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = (root or ROOT).joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _info(name: str, file: Path, root: Path) -> ModuleInfo:
    st = file.stat()
    memo = (str(file), st.st_size, st.st_mtime_ns)
    if memo not in _INFO:
        _INFO[memo] = _parse(name, file, root)
    return _INFO[memo]


def _parse(name: str, file: Path, root: Path) -> ModuleInfo:
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(file.read_text(), str(file))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules, libraries = set(), set()
    for candidate in found:
        parts = candidate.split(".")
        if parts[0] not in PACKAGES:
            if parts[0] and parts[0] not in sys.stdlib_module_names:
                libraries.add(parts[0])
            continue
        # `from a.b import c` names a module only if c is one; otherwise a is followed through b.
        while parts:
            if module_file(".".join(parts), root):
                modules.add(".".join(parts))
                break
            parts = parts[:-1]
    return ModuleInfo(frozenset(modules), frozenset(libraries), _starts(tree))


def _starts(tree: ast.Module) -> frozenset[str]:
    """A module-level ``STARTS = ("engines.vllm_worker", ...)``: the modules the file runs as
    subprocesses by path, which no import statement names."""
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "STARTS" and node.value is not None:
            value = ast.literal_eval(node.value)
            return frozenset(value)
    return frozenset()


@dataclass(frozen=True)
class Closure:
    """A module's code closure: every module of ours that runs when it runs."""

    local: dict[str, Path]  # run in this interpreter
    started: dict[str, Path]  # run in a subprocess, started by file path (and what they import)

    @property
    def files(self) -> dict[str, Path]:
        return dict(sorted({**self.local, **self.started}.items()))


def closure(*names: str, root: Path | None = None) -> Closure:
    """Each named module of this package and every one of its modules they import, transitively,
    plus the entry files they start as subprocesses (``STARTS``) and what those import.

    Read from the source (every ``import``, at any depth of the file), not from what happens to be
    imported in this process: a stage's key must cover the trainer, the losses, the engines and
    the grader it reaches, whether or not they were loaded yet.
    """
    root = root or ROOT
    local: dict[str, Path] = {}
    started: dict[str, Path] = {}
    todo = [(n, False) for n in names]
    while todo:
        name, sub = todo.pop()
        seen = started if sub else local
        if name in seen or (file := module_file(name, root)) is None:
            continue
        seen[name] = file
        info = _info(name, file, root)
        todo.extend((m, sub) for m in info.modules)
        todo.extend((m, True) for m in info.starts)
        if "." in name:  # a package's __init__ runs before any of its modules
            todo.append((name.rpartition(".")[0], sub))
    return Closure(dict(sorted(local.items())), dict(sorted(started.items())))


def module_closure(*names: str, root: Path | None = None) -> dict[str, Path]:
    """Every file of ours in the closure of ``names`` (see :func:`closure`), by module name."""
    return closure(*names, root=root).files


def libraries_of(files: dict[str, Path], root: Path | None = None) -> tuple[str, ...]:
    """The output-shaping distributions (``LIBRARIES``) the given modules import."""
    root = root or ROOT
    out: set[str] = set()
    for name, file in files.items():
        for lib in _info(name, file, root).libraries:
            out.update(LIBRARIES.get(lib, ()))
    return tuple(sorted(out))


_CODE_VERSIONS: dict[tuple[str, tuple[str, ...]], str] = {}


def code_version(*modules: str, root: Path | None = None) -> str:
    """Package version plus a digest of the code a stage runs: the source of its modules and of
    every module of this package they reach (:func:`closure`), subprocess entry files included.

    Memoised per process, because a key must name the code that runs: a file edited under a
    long run (a bench, a served schedule) would otherwise change the keys halfway through,
    while the process still runs what it imported.
    """
    root = root or ROOT
    memo = (str(root), modules)
    if memo not in _CODE_VERSIONS:
        h = hashlib.sha256()
        for name, file in closure(*modules, root=root).files.items():
            h.update(f"{name}\0".encode() + file.read_bytes() + b"\0")
        _CODE_VERSIONS[memo] = f"{package_version()}+{h.hexdigest()[:12]}"
    return _CODE_VERSIONS[memo]


def library_versions(dists: tuple[str, ...] | None = None) -> dict[str, str]:
    """Installed versions, in this interpreter, of ``dists`` (default: every shaping library)."""
    names = dists if dists is not None else sorted({d for v in LIBRARIES.values() for d in v})
    versions = {}
    for dist in names:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def forget_code_versions() -> None:
    """Drop the memoised code versions (a test that edits a copy of the code, then re-keys)."""
    _CODE_VERSIONS.clear()

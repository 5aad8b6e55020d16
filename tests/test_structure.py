"""The code's layout holds the architecture: which package may import which, and how.

``../shared/architecture.json`` draws the intended picture (parts, allowed arrows, arrows that
must never exist). A clone has nothing beside it, so what these checks need is embedded here;
``test_the_embedded_picture_is_the_shared_one`` compares the two where the shared file exists.

The import graph is read with ``ast`` from the source (nothing is imported): module-level and
function-local imports, ``import x.y``, ``from x import y`` and relative imports. Imports under
``if TYPE_CHECKING:`` never run, so they make no cycle, but they still count as an arrow.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("flows", "tasks", "data", "train", "engines", "world")

# Copied from ../shared/architecture.json ("never" and "arrows", parts named by their folder).
NEVER = {
    ("data", "flows"): "data/ is a plain library",
    ("data", "tasks"): "data/ is a plain library",
    ("data", "train"): "data/ knows no models",
    ("data", "engines"): "data/ knows no models",
    ("train", "flows"): "no orchestrator in the trainer",
    ("train", "tasks"): "no orchestrator in the trainer",
    ("train", "engines"): "no package cycle",
    ("engines", "flows"): "no orchestrator in engines",
    ("engines", "tasks"): "no orchestrator in engines",
    ("tasks", "flows"): "tasks do not know the flows that compose them",
    ("train", "world"): "the trainer knows no world",
    ("engines", "world"): "engines know no world",
    ("data", "world"): "data/ is a plain library",
}
MAY_IMPORT = {
    "flows": {"tasks", "data", "train", "engines", "world"},
    "tasks": {"data", "train", "engines", "world"},
    "data": set(),
    "train": {"data"},
    "engines": {"data", "train"},
    "world": {"data", "train", "engines"},
}
PREFECT_PACKAGES = {"flows", "tasks"}  # the orchestrator stays out of the libraries

# A function-local import of our own module says why on its line or the line above.
REASON = re.compile(r"#\s*deferred:\s*\S")

MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    """One imported name: where it is written and which module of ours (or which library) it reaches."""

    module: str  # the importing module, e.g. "flows.cli"
    path: str  # its file, relative to the repository
    line: int
    end: int  # the statement's last line
    target: str  # dotted: a module of ours when it is one, else what the statement names
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for package in PACKAGES
        for p in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


def _own(dotted: str) -> str | None:
    """The module of ours a dotted name lies in (``data.store.StageStore`` -> ``data.store``)."""
    while dotted not in MODULES and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted if dotted in MODULES else None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, up level - 1
        package = (
            module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        )
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    # ``from data import catalog`` imports the module data.catalog; ``from data.x import f``, data.x
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_of(module: str, path: Path) -> Iterator[Import]:
    rel = str(path.relative_to(REPO))

    def visit(node: ast.AST, local: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(module, child):
                    yield Import(
                        module,
                        rel,
                        child.lineno,
                        child.end_lineno or child.lineno,
                        target,
                        local,
                        type_only,
                    )
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            guarded = type_only or (isinstance(child, ast.If) and _is_type_checking(child))
            yield from visit(child, inner, guarded)

    yield from visit(ast.parse(path.read_text(), rel), False, False)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]
OWN = [imp for imp in IMPORTS if _own(imp.target) is not None]


def _package(dotted: str) -> str:
    return dotted.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_never_arrow_between_packages() -> None:
    """Every import counts, inside a function or for type checking only: no file is an exception."""
    wrong = [
        f"{imp.where} imports {imp.target}: {_package(imp.module)}/ -> {_package(imp.target)}/ "
        f"never ({NEVER[_package(imp.module), _package(imp.target)]})"
        for imp in OWN
        if (_package(imp.module), _package(imp.target)) in NEVER
    ]
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in OWN:
        if _package(imp.module) != _package(imp.target):
            graph[_package(imp.module)].add(_package(imp.target))
    assert not _cycles(graph)


def test_no_cycle_between_modules() -> None:
    """A circle of imports, even one closed by an import inside a function, means neither module
    can be read (or tested) without the other: what both need belongs in a third module."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in OWN:
        target = _own(imp.target)
        if not imp.type_only and target != imp.module:
            graph[imp.module].add(target)  # type: ignore[arg-type]
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_only_flows_and_tasks_import_prefect() -> None:
    wrong = [
        f"{imp.where} imports {imp.target}"
        for imp in IMPORTS
        if _package(imp.target) == "prefect" and _package(imp.module) not in PREFECT_PACKAGES
    ]
    assert not wrong, "\n".join(wrong)


def _reason_lines(imp: Import, covered: set[tuple[str, int]]) -> range:
    """The lines that may carry an import's reason: its own, and the one above its block of
    consecutive import statements (one comment may head a block)."""
    top = imp.line
    while (imp.path, top - 1) in covered:
        top -= 1
    return range(top - 1, imp.end + 1)


def test_a_function_local_import_of_our_own_code_says_why() -> None:
    """Our own modules are imported at the top; one deferred (its chain pulls torch or Prefect
    into ``mpd --help``) carries ``# deferred: <reason>`` on its line or above its block."""
    local = {(imp.path, imp.line): imp for imp in OWN if imp.local}
    print(f"function-local imports of our own modules: {len(local)}")
    covered = {(imp.path, n) for imp in IMPORTS for n in range(imp.line, imp.end + 1)}
    lines = {path: (REPO / path).read_text().splitlines() for path, _ in local}
    bare = [
        f"{imp.where}: {lines[imp.path][imp.line - 1].strip()}"
        for imp in sorted(local.values(), key=lambda i: (i.path, i.line))
        if not any(
            REASON.search(lines[imp.path][n - 1]) for n in _reason_lines(imp, covered) if n >= 1
        )
    ]
    assert not bare, f"{len(bare)} function-local imports without a reason:\n" + "\n".join(bare)


MAY_IMPORT_LINE = re.compile(r"^May import: (.+)$", re.M)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_it_holds_and_what_it_may_import(package: str) -> None:
    """``__init__.py`` opens with a docstring: a first line saying what the package holds, and a
    line ``May import: data/, train/`` (or ``May import: no other package of ours.``) naming the packages
    the picture allows it, which are then all it imports."""
    path = REPO / package / "__init__.py"
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and tree.body and isinstance(tree.body[0], ast.Expr), f"{path}: no docstring"
    assert len(doc.splitlines()[0]) > 20, f"{path}: the first line should say what it holds"
    said = MAY_IMPORT_LINE.search(doc)
    assert said, f"{path}: no line 'May import: ...' in the docstring"
    named = set(re.findall(r"\b(" + "|".join(PACKAGES) + r")/", said.group(1)))
    assert named == MAY_IMPORT[package], f"{path}: says {sorted(named)}"
    imported = {
        _package(imp.target)
        for imp in OWN
        if _package(imp.module) == package and _package(imp.target) != package
    }
    assert imported <= named, f"{package}/ imports {sorted(imported - named)} too"


def test_no_product_file_grows_over_400_lines() -> None:
    over = {
        str(path.relative_to(REPO))
        for path in MODULES.values()
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    print(f"product files over {MAX_LINES} lines: {sorted(over)}")
    assert not over, f"over {MAX_LINES} lines: {sorted(over)}: split them by job"


def test_the_embedded_picture_is_the_shared_one() -> None:
    shared = REPO.parent / "shared" / "architecture.json"
    if not shared.exists():
        pytest.skip(f"{shared} is absent (a clone has only the embedded copy)")
    picture = json.loads(shared.read_text())
    folder = {name: part["is"][0].rstrip("/") for name, part in picture["parts"].items()}
    never = {(folder[a], folder[b]) for a, b, *_ in picture["never"]}
    assert never == set(NEVER)
    arrows: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for a, b, *_ in picture["arrows"]:
        if folder[a] in arrows:
            arrows[folder[a]].add(folder[b])
    assert arrows == MAY_IMPORT


STARTUP_FORBIDDEN = ("torch", "transformers", "prefect", "vllm", "sympy")


def test_mpd_help_imports_no_heavy_library() -> None:
    """What the ``# deferred:`` imports are for: ``mpd --help`` (and the modules ``mpd sql``,
    ``mpd status`` and ``mpd config show`` run, all imported at the top of flows/cli.py) load
    no torch, transformers, Prefect, vLLM or sympy."""
    code = (
        "import json, sys\n"
        "from flows.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(set({STARTUP_FORBIDDEN!r}) & set(sys.modules))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []

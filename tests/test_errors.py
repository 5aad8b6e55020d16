"""Errors by meaning (data.errors): every error class of the package has one kind, and the
CLI turns each kind into its exit: a user mistake one line and 2, a transient failure one line
and 1, an exhausted resource (disk, memory) one line and 1, a bug its traceback.

Two audits over the product code (``PRODUCT``) keep it so: every error class derives from
exactly one of the four bases and from no builtin error but ``Exception`` (a second base such as
``ValueError`` let an ``except ValueError`` decide a kind by accident), and every handler that
catches everything (``except Exception``, ``except BaseException``, a bare ``except``,
``contextlib.suppress(Exception)``) says on its line why it is a boundary.
"""

from __future__ import annotations

import ast
import builtins
import errno
import importlib
from pathlib import Path

import pytest
import torch

from data.catalog import ReadOnlyError, SqlError
from data.diskfull import DiskFullError
from data.errors import (
    BASES,
    InternalError,
    is_out_of_memory,
    is_retried,
    kind_of,
    one_line,
)
from data.hub_errors import HubUnreachableError
from data.lock import WorkspaceBusyError
from data.memory import MemoryExhaustedError
from data.schemas import SchemaError
from data.sources import ProblemSourceError
from data.stage_writer import CorruptShardError
from data.storage_errors import StorageError, StorageUnreachableError
from engines.base import EngineUnavailableError
from engines.openai_http import EngineGaveUpError, EngineRefusedError
from engines.vllm_proc import WorkerError, WorkerRefusedError
from flows import cli
from flows.config import ConfigError
from tasks.filter import FilterError
from tests.conftest import REPO
from train.checkpoint import CheckpointMismatchError
from train.models import ModelLoadError, TokenizerMismatchError
from train.trainer import TrainInputError
from world.manifest import AssetsError

PRODUCT = ("data", "tasks", "flows", "train", "engines", "world")

USER = [
    ConfigError,
    WorkspaceBusyError,
    SqlError,
    ReadOnlyError,
    ProblemSourceError,
    ModelLoadError,
    TokenizerMismatchError,
    AssetsError,
    EngineUnavailableError,
    EngineRefusedError,
    FilterError,
    TrainInputError,
    CheckpointMismatchError,
    StorageError,
    WorkerRefusedError,
]
TRANSIENT = [
    WorkerError,
    EngineGaveUpError,
    ConnectionError,
    TimeoutError,
    StorageUnreachableError,
    HubUnreachableError,
]
BUGS = [
    ValueError,
    RuntimeError,
    KeyError,
    SchemaError,
    CorruptShardError,
    InternalError,
    FileNotFoundError,
    AssertionError,
]


@pytest.mark.parametrize("cls", USER)
def test_user_mistakes_are_never_retried(cls: type[Exception]) -> None:
    assert kind_of(cls("x")) == "user" and not is_retried(cls("x"))


@pytest.mark.parametrize("cls", TRANSIENT)
def test_transient_failures_are_retried(cls: type[Exception]) -> None:
    """A dead vLLM worker, a server that outlived the request retries, an object store or the
    model hub not answering: retried (the review found the first two subclassed ValueError,
    which the stage task never retried, and the store a user mistake)."""
    assert kind_of(cls("x")) == "transient" and is_retried(cls("x"))


@pytest.mark.parametrize("cls", BUGS)
def test_anything_else_is_a_bug(cls: type[Exception]) -> None:
    """A ValueError from our own code (a zip(strict=True), a shape check) is a bug, not a user
    mistake: a traceback, no retry."""
    assert kind_of(cls("x")) == "bug" and not is_retried(cls("x"))


def _raised_during(exc: Exception, cause: BaseException) -> Exception:
    """``exc`` as Python chains it when raised while handling ``cause`` (torch's zip writer)."""
    try:
        try:
            raise cause
        except BaseException:
            raise exc  # noqa: B904 (the implicit chain is the point)
    except Exception as chained:
        return chained


def _cpu_allocation_failure() -> RuntimeError:
    """torch's own error for an allocation the CPU allocator refused (a real one: 2**62 bytes is
    past any address space, so it fails at once and reserves nothing)."""
    try:
        torch.empty(2**60, dtype=torch.float32)
    except RuntimeError as exc:
        return exc
    raise AssertionError("an allocation of 4 EiB succeeded")


RESOURCE = [
    DiskFullError("disk full writing x"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    _raised_during(RuntimeError("unexpected pos 4995328"), OSError(errno.ENOSPC, "full")),
    RuntimeError("IO Error: Could not write file: No space left on device"),  # DuckDB's words
    MemoryExhaustedError("out of memory loading model x"),
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ..."),
    RuntimeError("CUDA error: out of memory"),  # a kernel launch's words
    _cpu_allocation_failure(),
    OSError(errno.ENOMEM, "Cannot allocate memory"),  # fork, mmap
]


@pytest.mark.parametrize("exc", RESOURCE, ids=lambda e: type(e).__name__ + ": " + str(e)[:30])
def test_an_exhausted_resource_is_never_retried(exc: Exception) -> None:
    """A full disk or memory out: not the user's input, not a bug, and not retried (a retry
    seconds later meets the same full disk, the same model too big for the GPU)."""
    assert kind_of(exc) == "resource" and not is_retried(exc)


def test_the_allocator_words_are_what_torch_says() -> None:
    """The CPU allocator's failure is a plain RuntimeError: only its words say memory."""
    exc = _cpu_allocation_failure()
    assert type(exc) is RuntimeError and is_out_of_memory(exc)
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(
        ValueError("CUDA out of memory")  # the words count from the allocator's type only
    )


# -- the two audits of the product code ---------------------------------------------------------
def _product_files() -> list[Path]:
    return sorted(p for root in PRODUCT for p in (REPO / root).rglob("*.py"))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _error_classes() -> list[type[BaseException]]:
    """Every exception class defined in the product code (each module imported, as mpd does)."""
    found = []
    for path in _product_files():
        module = importlib.import_module(_module_name(path))
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, BaseException)
            and obj.__module__ == module.__name__
        ]
    return found


BUILTIN_ERRORS = {
    obj
    for obj in vars(builtins).values()
    if isinstance(obj, type) and issubclass(obj, BaseException)
} - {Exception, BaseException}


def test_every_error_class_has_exactly_one_kind_and_no_builtin_base() -> None:
    classes = _error_classes()
    assert {c.__name__ for c in USER + TRANSIENT[:1]} <= {c.__name__ for c in classes}
    wrong = []
    for cls in classes:
        kinds = [kind for kind, base in BASES.items() if issubclass(cls, base)]
        builtin = [b.__name__ for b in cls.__mro__ if b in BUILTIN_ERRORS]
        if cls in BASES.values():
            continue
        if len(kinds) != 1 or builtin:
            wrong.append(f"{cls.__module__}.{cls.__name__}: kinds {kinds}, builtin {builtin}")
    assert not wrong, "\n".join(wrong)
    assert len(classes) >= 25  # the audit saw the product's classes, not an empty list


def _names(node: ast.expr | None) -> set[str]:
    if node is None:
        return {"<bare>"}
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


CATCH_ALL = {"Exception", "BaseException", "<bare>"}


def catch_alls(source: str) -> list[int]:
    """Line numbers of every handler in ``source`` that catches everything."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ExceptHandler):
            caught = _names(node.type)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "suppress":
            caught = set().union(set(), *(_names(arg) for arg in node.args))
        else:
            continue
        if caught & CATCH_ALL:
            lines.append(node.lineno)
    return sorted(lines)


def test_the_audit_finds_every_form_of_catch_all() -> None:
    source = (
        "try:\n    f()\nexcept Exception:\n    pass\n"
        "try:\n    f()\nexcept (OSError, BaseException):\n    pass\n"
        "try:\n    f()\nexcept:\n    pass\n"
        "with contextlib.suppress(Exception):\n    f()\n"
        "try:\n    f()\nexcept (OSError, ValueError):\n    pass\n"
    )
    assert catch_alls(source) == [3, 7, 11, 13]


def test_every_catch_all_in_the_product_is_a_documented_boundary() -> None:
    """Nothing is classified by catching everything: a handler that does (the CLI's exit, the
    flow's Failed state, a thread handing its failure to its caller, a subprocess reporting to
    its parent, an undo before re-raising) says on its line why it is a boundary."""
    undocumented, seen = [], 0
    for path in _product_files():
        lines = path.read_text().splitlines()
        for n in catch_alls(path.read_text()):
            seen += 1
            if "# boundary:" not in lines[n - 1]:
                undocumented.append(f"{path.relative_to(REPO)}:{n}: {lines[n - 1].strip()}")
    assert not undocumented, "\n".join(undocumented)
    assert seen > 0


# -- the CLI's exit per kind ---------------------------------------------------------------------
def _raising(exc: BaseException):
    def func(_args):
        raise exc

    return func


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("bad key\nand more"), 2),
        (WorkerError("the worker died"), 1),
        (DiskFullError("disk full writing x: free space there"), 1),
        (MemoryExhaustedError("out of memory loading model x (float32) on cuda:0: ..."), 1),
    ],
)
def test_cli_prints_one_line_per_kind(
    exc: Exception, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, _raising(exc), args))
    assert cli.main(["status"]) == code
    err = capsys.readouterr().err
    assert err == f"mpd: error: {one_line(exc)}\n" and "Traceback" not in err


def test_cli_lets_a_bug_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, _raising(KeyError("k")), args))
    with pytest.raises(KeyError):
        cli.main(["status"])


class _Fixed:
    """A parser whose parse_args returns ``args`` with ``func`` replaced (the command to test)."""

    def __init__(self, parser, func, args) -> None:
        self.parser, self.args = parser, args
        self.args.func = func

    def parse_args(self, argv):
        return self.args

    def print_help(self) -> None:
        self.parser.print_help()

"""Errors by meaning (data.errors): every error class of the package has one kind, and the
CLI turns each kind into its exit: a user mistake one line and 2, a transient failure one line
and 1, a bug its traceback."""

from __future__ import annotations

import errno

import pytest

from data.catalog import ReadOnlyError, SqlError
from data.diskfull import DiskFullError
from data.errors import TransientError, UserError, is_retried, kind_of, one_line
from data.lock import WorkspaceBusyError
from data.schemas import SchemaError
from data.sources import ProblemSourceError
from data.storage_errors import StorageError, StorageUnreachableError
from engines.base import EngineUnavailableError
from engines.openai import EngineGaveUpError, EngineRefusedError, EngineRequestError
from engines.vllm_proc import WorkerError
from flows import cli
from flows.config import ConfigError
from tasks.filter import FilterError
from train.assets import AssetsError
from train.checkpoint import CheckpointMismatchError
from train.models import ModelLoadError, TokenizerMismatchError
from train.trainer import TrainInputError

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
]
TRANSIENT = [WorkerError, EngineGaveUpError, ConnectionError, TimeoutError, StorageUnreachableError]
BUGS = [ValueError, RuntimeError, KeyError, SchemaError, FileNotFoundError, AssertionError]


@pytest.mark.parametrize("cls", USER)
def test_user_mistakes_are_never_retried(cls: type[Exception]) -> None:
    assert kind_of(cls("x")) == "user" and not is_retried(cls("x"))


@pytest.mark.parametrize("cls", TRANSIENT)
def test_transient_failures_are_retried(cls: type[Exception]) -> None:
    """A dead vLLM worker and a server that outlived the request retries: retried (the
    review found both subclassed ValueError, which the stage task never retried)."""
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


RESOURCE = [
    DiskFullError("disk full writing x"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    _raised_during(RuntimeError("unexpected pos 4995328"), OSError(errno.ENOSPC, "full")),
    RuntimeError("IO Error: Could not write file: No space left on device"),  # DuckDB's words
]


@pytest.mark.parametrize("exc", RESOURCE, ids=lambda e: type(e).__name__ + ": " + str(e)[:30])
def test_a_full_disk_is_a_resource_failure_never_retried(exc: Exception) -> None:
    """Not the user's input, not a bug, and not retried: a retry meets the same full disk."""
    assert kind_of(exc) == "resource" and not is_retried(exc)


def test_both_request_errors_are_request_errors() -> None:
    assert issubclass(EngineRefusedError, EngineRequestError)
    assert issubclass(EngineGaveUpError, EngineRequestError)
    assert issubclass(EngineRefusedError, UserError) and issubclass(
        EngineGaveUpError, TransientError
    )


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

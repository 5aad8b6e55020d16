"""How each format of a user's problem source is read into columns (``data/sources.py`` checks
what they hold).

A reader returns a :class:`Table`: every column name it saw, the values of the wanted columns,
and where each row sits (a JSONL line number, else a row index) so that a message can point at
it. Nothing here writes: ``mpd run`` reads the file once before Prefect starts
(``flows/preflight.py``) and once more in the problems stage, with the same code.

JSON lines are parsed by Arrow's JSON reader when the file is exactly one object per line, else
with orjson, one line at a time (the standard library's ``json`` takes three times as long),
each bad line named by number and each byte that is not UTF-8 by its offset in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pajson

from data.errors import UserError
from data.hub_errors import HubUnreachableError, not_answered, said, transport_errors

Format = Literal["auto", "jsonl", "parquet", "hf_disk", "hf_dataset"]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BOM = b"\xef\xbb\xbf"
EXACT_FLOAT = 2.0**53  # orjson reads an integer past 64 bits as a float: past this, not exact


class ProblemSourceError(UserError):
    """The user's problem file cannot be turned into problems; says why in one line."""


@dataclass
class Table:
    """What a reader found: every column name, and the values of the wanted ones."""

    columns: list[str]
    data: dict[str, list[Any]]
    n_rows: int
    lines: list[int] | None = None  # JSONL line number of each row, for messages
    split_names: list[str] | None = None  # DatasetDict split of each row

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


def detect_format(path: Path, fmt: Format) -> Format:
    """The concrete format of ``path``; errors when it is missing or unrecognisable."""
    if not path.exists():
        raise ProblemSourceError(f"problem source not found: {path}")
    if fmt == "auto":
        if path.is_dir():
            if any((path / m).exists() for m in HF_MARKERS):
                return "hf_disk"
            if parquet_files(path):
                return "parquet"
            raise ProblemSourceError(
                f"{path}: directory holds neither a datasets save_to_disk dataset "
                f"({', '.join(HF_MARKERS)}) nor .parquet files"
            )
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return "jsonl"
        if suffix in PARQUET_SUFFIXES:
            return "parquet"
        raise ProblemSourceError(
            f"{path}: unknown format (suffix {suffix or 'none'!r}); use .jsonl, .ndjson, "
            ".parquet, .pq, a save_to_disk directory, or set format to jsonl/parquet/hf_disk"
        )
    if fmt == "jsonl" and path.is_dir():
        raise ProblemSourceError(f"{path}: format 'jsonl' needs a file, got a directory")
    if fmt == "hf_disk" and not path.is_dir():
        raise ProblemSourceError(f"{path}: format 'hf_disk' needs a save_to_disk directory")
    return fmt


def parquet_files(directory: Path) -> list[Path]:
    """Parquet files under ``directory`` in a fixed order, skipping ``_``/``.`` entries."""
    files = [
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in PARQUET_SUFFIXES
        and p.is_file()
        and not any(part.startswith(("_", ".")) for part in p.relative_to(directory).parts)
    ]
    return sorted(files)


def read_jsonl(path: Path, wanted: list[str], limit: int | None) -> Table:
    """One JSON object per line; blank lines (a trailing one, CRLF endings) and a UTF-8 byte
    order mark are fine, anything else that is not JSON is named by its line.

    A file of exactly one object per line, whose wanted columns hold text or integers, is read
    by Arrow's JSON reader (:func:`_read_arrow`: C++, both cores, no Python object but the
    wanted cells; a 100 MB file in ~0.35 s against ~0.75 s line by line); anything else, and
    every file with an error, is read line by line (:func:`_read_lines`), which names the line.
    The two give the same table (tests/test_sources.py holds them to it).
    """
    if limit is None and (table := _read_arrow(path, wanted)) is not None:
        return table
    return _read_lines(path, wanted, limit)


_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
# Arrow types whose Python values are what orjson gives for the same JSON (a double is not:
# 1 would come back as 1.0, and an integer past 64 bits as a rounded float).
_EXACT_TYPES = (pa.types.is_string, pa.types.is_int64, pa.types.is_boolean, pa.types.is_null)


def _read_arrow(path: Path, wanted: list[str]) -> Table | None:
    """The file through ``pyarrow.json``, or None where that could differ from reading it line
    by line: a blank line inside (Arrow skips it: rows would lose their line numbers), two
    objects on a line (Arrow takes both; the line reader refuses the line), a type Arrow
    cannot hold (a column of text and numbers) or does not give back exactly, bad bytes.

    The bytes are read once and never copied: Arrow parses them, and the checks for blank
    lines and the line count scan them in place (numpy)."""
    data = path.read_bytes()
    start = len(BOM) if data.startswith(BOM) else 0
    body = np.frombuffer(data, np.uint8)[start:]
    end = len(body)
    while end and body[end - 1] in _SPACE:  # trailing blank lines and spaces
        end -= 1
    body = body[:end]
    if not end or _BLANK_LINE.search(body.data):
        return None
    try:
        table = pajson.read_json(pa.py_buffer(body.data))
        if body.max() >= 0x80:  # Arrow's reader lets bytes that are not UTF-8 through
            table.validate(full=True)
    except (pa.ArrowException, UnicodeDecodeError):
        return None
    lines = int(np.count_nonzero(body == _NEWLINE)) + 1
    present = [c for c in wanted if c in table.column_names]
    if table.num_rows != lines or not all(
        any(exact(table.schema.field(c).type) for exact in _EXACT_TYPES) for c in present
    ):
        return None
    columns = {c: table.column(c).to_pylist() for c in present}
    return Table(table.column_names, columns, lines, lines=list(range(1, lines + 1)))


_SPACE = frozenset(b" \t\r\n")
_NEWLINE = ord("\n")


def _read_lines(path: Path, wanted: list[str], limit: int | None) -> Table:
    """Line by line: blank lines skipped, each bad line named by number.

    The loop is the cost of a large file, so it does per line only what it must.
    """
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    keys: dict[str, None] = {}
    offset, loads = 0, orjson.loads
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if lineno == 1 and line.startswith(BOM):
                line, start = line[len(BOM) :], start + len(BOM)
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except orjson.JSONDecodeError as exc:
                raise _line_error(path, lineno, start, line, exc) from None
            if type(obj) is not dict:
                raise ProblemSourceError(
                    f"{path}:{lineno}: expected one JSON object per line, got {type(obj).__name__}"
                )
            if obj.keys() != keys.keys():
                keys.update(dict.fromkeys(obj))
            rows.append(obj)
            lines.append(lineno)
    data = {c: list(map(dict.get, rows, repeat(c))) for c in wanted if c in keys}
    if any(float in set(map(type, values)) for values in data.values()):
        _exact_integers(path, data, lines)
    return Table(list(keys), data, len(rows), lines=lines)


def _line_error(
    path: Path, lineno: int, start: int, line: bytes, exc: orjson.JSONDecodeError
) -> ProblemSourceError:
    """A line orjson refused: bytes that are not UTF-8 (by their offset), else bad JSON."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return ProblemSourceError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{line[bad.start]:02x} at byte offset "
            f"{start + bad.start} of the file): save it as UTF-8"
        )
    return ProblemSourceError(f"{path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})")


def _exact_integers(path: Path, data: dict[str, list[Any]], lines: list[int]) -> None:
    """orjson reads an integer past 64 bits as a float (``2**70`` loses its last digits):
    such rows are read again with ``json``, which keeps every digit. Rare, so a second pass."""
    redo = {
        lines[i]: i
        for values in data.values()
        for i, v in enumerate(values)
        if type(v) is float and abs(v) >= EXACT_FLOAT
    }
    if not redo:
        return
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if (i := redo.get(lineno)) is not None:
                obj = json.loads(line.removeprefix(BOM))
                for column, values in data.items():
                    values[i] = obj.get(column)


def read_parquet(path: Path, wanted: list[str], limit: int | None) -> Table:
    """Read only the wanted columns of a file or a directory of files (sorted order)."""
    import pyarrow.dataset as pads

    files = parquet_files(path) if path.is_dir() else [path]
    if not files:
        raise ProblemSourceError(f"{path}: no .parquet files in this directory")
    try:
        dataset = pads.dataset([str(f) for f in files], format="parquet")
        columns = list(dataset.schema.names)
        present = [c for c in wanted if c in columns]
        if limit is None:
            table = dataset.to_table(columns=present)
        else:
            table = dataset.head(limit, columns=present)
    except (pa.ArrowException, OSError) as exc:
        raise ProblemSourceError(f"{path}: cannot read Parquet ({exc})") from None
    return Table(columns, table.to_pydict(), table.num_rows)


def read_hf_disk(path: Path, wanted: list[str], limit: int | None, split: str | None) -> Table:
    """Read a save_to_disk Dataset, one split of a DatasetDict, or all its splits."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))  # local files only: no hub access
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ProblemSourceError(f"{path}: cannot load datasets save_to_disk ({exc})") from None
    return dataset_table(path, loaded, wanted, limit, split)


def read_hf_dataset(
    path: str, name: str | None, wanted: list[str], limit: int | None, split: str | None
) -> Table:
    """``datasets.load_dataset(path, name)``: a Hugging Face dataset id (``openai/gsm8k`` with
    name ``main``), or a local directory or file that ``datasets`` reads (a directory holding
    ``train.jsonl`` and ``test.jsonl`` becomes splits train and test).

    Its failures by meaning: the hub not answering (refused, timed out, a 5xx or 429 after the
    hub client's own retries) is transient (:class:`HubUnreachableError`: the stage task retries
    it); the hub switched off here (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, the user's own
    setting) with the dataset not in the cache, no such dataset, config or split, files that do
    not parse: the user's (:class:`ProblemSourceError`, saying what to set). Anything else is a
    bug and keeps its traceback.
    """
    import datasets

    local = Path(path).expanduser()
    source = str(local) if local.exists() else path
    datasets.disable_progress_bars()  # one problem set, not a progress display
    try:
        loaded = datasets.load_dataset(source, name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError, *transport_errors()) as exc:
        # OSError: the hub (ConnectionError, the hub client's HTTP errors), a missing file;
        # ValueError: no such config or split; DatasetsError: files that do not parse; the
        # HTTP client's transport errors (a connection dropped mid-answer) come through raw.
        raise _hub_failure(path, exc, datasets.config.HF_HUB_OFFLINE) from None
    return dataset_table(Path(path), loaded, wanted, limit, split)


def _hub_failure(path: str, exc: BaseException, offline: bool) -> Exception:
    """What a failed ``load_dataset`` means (``data/hub_errors.py``): the hub not answering is
    transient, unless the hub is switched off here (the user's setting); the rest is the
    user's."""
    if (err := not_answered(exc)) is None:
        return ProblemSourceError(f"{path}: datasets.load_dataset failed ({said(exc)})")
    if offline:
        switch = (
            "HF_DATASETS_OFFLINE" if os.environ.get("HF_DATASETS_OFFLINE") else "HF_HUB_OFFLINE"
        )
        return ProblemSourceError(
            f"{path}: no such local path, and the Hugging Face hub is switched off here ({switch})"
            " with this dataset not cached: set problems.path to a local copy (JSONL or Parquet "
            "files, or a save_to_disk directory)"
        )
    return HubUnreachableError(
        f"{path}: the Hugging Face hub did not answer ({said(err)}); run again later, or set "
        "problems.path to a local copy"
    )


def dataset_table(
    path: Path, loaded: Any, wanted: list[str], limit: int | None, split: str | None
) -> Table:
    """A loaded Dataset or DatasetDict as a table: one split, or all with their names."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is not None:
            if split not in loaded:
                raise ProblemSourceError(
                    f"{path}: split {split!r} not found; available: {', '.join(names)}"
                )
            names = [split]
        parts = [(name, loaded[name]) for name in names]
        # Several splits: their names say train/test. One split: hash it like a Dataset.
        split_names: list[str] | None = [] if len(parts) > 1 else None
    else:
        if split is not None:
            raise ProblemSourceError(
                f"{path}: split={split!r} given but this is a single Dataset, not a DatasetDict"
            )
        parts, split_names = [("", loaded)], None
    if not parts:
        return Table([], {}, 0)
    columns = list(parts[0][1].column_names)
    present = [c for c in wanted if c in columns]
    data: dict[str, list[Any]] = {c: [] for c in present}
    n_rows = 0
    for name, ds in parts:
        if limit is not None:
            ds = ds.select(range(min(limit - n_rows, len(ds))))
        if missing := [c for c in present if c not in ds.column_names]:
            raise ProblemSourceError(f"{path}: split {name!r} lacks column(s) {', '.join(missing)}")
        for column, values in (
            ds.select_columns(present).with_format("arrow")[:].to_pydict().items()
        ):
            data[column].extend(values)
        n_rows += len(ds)
        if split_names is not None:
            split_names.extend([name] * len(ds))
    return Table(columns, data, n_rows, split_names=split_names)

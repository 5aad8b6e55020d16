"""What ``mpd sql`` shows and writes: a query result as text, CSV or JSON, or a Parquet file.

The catalog (``data/catalog.py``) answers queries; rendering them for a terminal or a program,
and refusing an ``--out`` that would land inside the store's own directories, is the CLI's.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from data.diskfull import disk_full_error
from data.errors import is_disk_full
from data.sql_guard import SqlError
from data.tables import tables

Format = Literal["table", "csv", "json"]
_CELL_WIDTH = 48
_LIST_ITEMS = 6


def format_table(table: pa.Table, fmt: Format = "table", *, max_rows: int | None = 100) -> str:
    """Render a query result as aligned text, CSV or JSON.

    ``table`` is for reading: long text and lists are shortened, floats get
    4 decimals, at most ``max_rows`` rows are shown. ``csv`` and ``json`` are
    for programs: every row, full values; lists, maps and structs are JSON
    (inside a CSV cell, too), NaN/inf become null, maps become JSON objects.
    ``json`` is an array of row objects, one per line.
    """
    if fmt == "table":
        if table.column_names == ["explain_key", "explain_value"]:  # EXPLAIN: show the plan
            return "\n".join(str(v) for v in table.column("explain_value").to_pylist())
        return _format_text(table, max_rows)
    rows = _python_rows(table)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_csv_cell(row[name]) for name in table.column_names] for row in rows)
        return out.getvalue()
    if fmt == "json":
        lines = [json.dumps(_finite(row), ensure_ascii=False, allow_nan=False) for row in rows]
        return "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    raise ValueError(f"unknown format {fmt!r}: use table, csv or json")


def _python_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts; the Arrow type decides how maps etc. convert."""
    columns = {
        field.name: [_plain(v, field.type) for v in table.column(i).to_pylist()]
        for i, field in enumerate(table.schema)
    }
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def _plain(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_map(arrow_type):
        return {str(k): _plain(v, arrow_type.item_type) for k, v in value}
    if isinstance(arrow_type, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
        return [_plain(v, arrow_type.value_type) for v in value]
    if pa.types.is_struct(arrow_type):
        return {f.name: _plain(value.get(f.name), f.type) for f in arrow_type}
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(_finite(value), ensure_ascii=False)
    return str(value)


def _format_text(table: pa.Table, max_rows: int | None) -> str:
    shown = table if max_rows is None else table.slice(0, max_rows)
    names = table.column_names
    numeric = [
        pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
        for f in table.schema
    ]
    cells = [
        [_text_cell(_plain(v, field.type)) for v in col.to_pylist()]
        for field, col in zip(shown.schema, shown.columns, strict=True)
    ]
    widths = [max([len(n), *(len(c) for c in col)]) for n, col in zip(names, cells, strict=True)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out.extend(line([col[i] for col in cells]) for i in range(shown.num_rows))
    total = table.num_rows
    if shown.num_rows < total:
        out.append(f"({shown.num_rows} of {total} rows shown; --format csv or --out for all)")
    else:
        out.append(f"({total} row{'' if total == 1 else 's'})")
    return "\n".join(out) + "\n"


def _text_cell(value: Any) -> str:
    """One value, short and on one line, for reading in a terminal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, list):
        items = [_text_cell(v) for v in value[:_LIST_ITEMS]]
        more = f", … +{len(value) - _LIST_ITEMS}" if len(value) > _LIST_ITEMS else ""
        return _shorten("[" + ", ".join(items) + more + "]")
    if isinstance(value, dict):
        return _shorten("{" + ", ".join(f"{k}: {_text_cell(v)}" for k, v in value.items()) + "}")
    return _shorten(str(value))


def _shorten(text: str) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def check_out_path(path: Path | str, workspace: Path | str | None = None) -> Path:
    """Where ``--out`` may write: a ``.parquet`` file, not inside a stage's directory.

    Checked before the query runs (a long query must not fail at its last step), and so that
    nothing a user points ``--out`` at can replace a committed shard or staging data.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".parquet":
        raise SqlError(f"--out must name a .parquet file, got {str(path)!r}")
    if path.is_dir():
        raise SqlError(f"--out {path} is a directory: name a .parquet file")
    for existing in path.parents:
        if existing.exists():
            if not existing.is_dir():
                raise SqlError(f"--out {path}: {existing} is a file, not a directory")
            break
    if workspace is not None:
        ws = Path(workspace).resolve()
        target = path.resolve()
        if target.is_relative_to(ws):
            top = target.relative_to(ws).parts[0]
            # the workspace's directories that only the store writes (stage outputs, staging)
            protected = {t.stage for t in tables().values()}
            if top in protected or top.startswith("."):
                raise SqlError(
                    f"--out {path} is inside the workspace's {top}/, which mpd owns: "
                    "write the result elsewhere (e.g. --out exports/result.parquet)"
                )
    return path


def write_parquet_atomic(data: pa.Table | pa.RecordBatchReader, path: Path | str) -> int:
    """Write ``data`` to ``path`` (must end in .parquet) via a temp file and a rename; return
    the number of rows written.

    A reader's batches are written as they arrive (``mpd sql --out`` passes DuckDB's stream),
    so the result is never whole in memory. A reader of the file (or a crash) never sees half
    of it; a failed or interrupted write leaves no temporary behind. Parent directories are
    created.
    """
    path = check_out_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    reader = data.to_reader() if isinstance(data, pa.Table) else data
    rows = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
        os.replace(tmp, path)
    except OSError as exc:
        if is_disk_full(exc):  # the machine's, not the query's: exit 1, like a stage's write
            raise disk_full_error(path, exc) from None
        raise SqlError(f"cannot write --out {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rows

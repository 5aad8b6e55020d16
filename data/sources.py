"""Load the user's own problems (JSONL, Parquet, or a ``datasets`` save_to_disk).

A user's file is the one input we do not control, so every way it can be
wrong is a one-line :class:`ProblemSourceError` naming the file and the fix
(a misspelt column gets the closest real name), raised before any model runs.
Rows become records of the ``problems`` table (``data/schemas.py``, minus
``round``), e.g. from ``{"question": "What is 2+3?", "solution": 5}``::

    {"problem_id": "gsm-000017-3f2a9c1b", "family": "gsm", "split": "train",
     "difficulty": 0, "prompt": "What is 2+3?", "answer": "5",
     "source": "data/gsm.jsonl"}

Splits come from a split column, from a DatasetDict's split names, or else
from a hash of the prompt and the seed: reordering or appending rows never
moves a problem between train and test, and identical prompts always land on
the same side (no train/test leakage through duplicates).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from data.answers import last_boxed
from data.configbase import StrictModel
from data.errors import UserError

Format = Literal["auto", "jsonl", "parquet", "hf_disk", "hf_dataset"]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TRAIN_NAMES = frozenset({"train", "training"})
TEST_NAMES = frozenset({"test", "testing", "validation", "valid", "val", "dev", "eval"})


class ProblemSourceError(UserError, ValueError):
    """The user's problem file cannot be turned into problems; says why in one line."""


class ProblemSourceConfig(StrictModel):
    """Where the user's problems are and which columns mean what."""

    path: str = Field(
        min_length=1,
        description="JSONL file, Parquet file or directory of Parquet files, a directory "
        "written by datasets' save_to_disk (Dataset or DatasetDict), or (format hf_dataset) a "
        "Hugging Face dataset id or a local directory datasets.load_dataset reads.",
    )
    format: Format = Field(
        "auto",
        description="auto: .jsonl/.ndjson -> jsonl, .parquet/.pq or a directory of them -> "
        "parquet, a directory with dataset_info.json/state.json/dataset_dict.json -> hf_disk. "
        "hf_dataset (never chosen by auto): datasets.load_dataset(path, name).",
    )
    prompt_column: str = Field("prompt", min_length=1, description="Column with the question.")
    answer_column: str = Field("answer", min_length=1, description="Column with the gold answer.")
    id_column: str | None = Field(
        None,
        description="Column of unique problem ids; default '<family>-<row:06d>-<sha256(prompt)[:8]>'.",
    )
    split_column: str | None = Field(
        None,
        description="Column whose values say train (train/training) or test "
        "(test/validation/val/dev/eval); default: the hash split below.",
    )
    name: str | None = Field(
        None, description="hf_dataset: the dataset's config name (GSM8K's: main)."
    )
    split: str | None = Field(
        None,
        description="hf_disk / hf_dataset DatasetDict only: the one split to read (then split by "
        "split_column or hash). Default: all splits, their names acting as the split column "
        "when there are several.",
    )
    test_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of problems put in test by a seeded hash of the prompt, "
        "when neither split_column nor DatasetDict split names say it.",
    )
    answer_format: Literal["plain", "gsm8k", "boxed"] = Field(
        "plain",
        description="How the gold answer sits in answer_column. plain: the whole cell; gsm8k: "
        "after the last '####' of a worked solution (thousands commas dropped), as in GSM8K's "
        "answer column; boxed: the last \\boxed{...} of a solution, as in MATH's solution "
        "column.",
    )
    scorer: Literal["math", "exact"] = Field(
        "math", description="math: math-verify equivalence; exact: whitespace-normalised text."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N rows.")
    family: str | None = Field(
        None, min_length=1, description="Family name of these problems; default the file stem."
    )


@dataclass
class _Table:
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
            if _parquet_files(path):
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


def _parquet_files(directory: Path) -> list[Path]:
    """Parquet files under ``directory`` in a fixed order, skipping ``_``/``.`` entries."""
    files = [
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in PARQUET_SUFFIXES
        and p.is_file()
        and not any(part.startswith(("_", ".")) for part in p.relative_to(directory).parts)
    ]
    return sorted(files)


def _read_jsonl(path: Path, wanted: list[str], limit: int | None) -> _Table:
    """Parse JSON lines by hand so a bad line is reported with its line number."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProblemSourceError(
                        f"{path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise ProblemSourceError(
                        f"{path}:{lineno}: expected one JSON object per line, "
                        f"got {type(obj).__name__}"
                    )
                columns.update(dict.fromkeys(obj))
                rows.append(obj)
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise ProblemSourceError(f"{path}: not UTF-8 text ({exc.reason})") from None
    data = {c: [r.get(c) for r in rows] for c in wanted if c in columns}
    return _Table(list(columns), data, len(rows), lines=lines)


def _read_parquet(path: Path, wanted: list[str], limit: int | None) -> _Table:
    """Read only the wanted columns of a file or a directory of files (sorted order)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    files = _parquet_files(path) if path.is_dir() else [path]
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
    return _Table(columns, table.to_pydict(), table.num_rows)


def _read_hf_disk(path: Path, wanted: list[str], limit: int | None, split: str | None) -> _Table:
    """Read a save_to_disk Dataset, one split of a DatasetDict, or all its splits."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))  # local files only: no hub access
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ProblemSourceError(f"{path}: cannot load datasets save_to_disk ({exc})") from None
    return _dataset_table(path, loaded, wanted, limit, split)


def _read_hf_dataset(cfg: ProblemSourceConfig, wanted: list[str]) -> _Table:
    """``datasets.load_dataset(path, name)``: a Hugging Face dataset id (``openai/gsm8k`` with
    name ``main``), or a local directory or file that ``datasets`` reads (a directory holding
    ``train.jsonl`` and ``test.jsonl`` becomes splits train and test)."""
    import datasets

    local = Path(cfg.path).expanduser()
    source = str(local) if local.exists() else cfg.path
    datasets.disable_progress_bars()  # one problem set, not a progress display
    try:
        loaded = datasets.load_dataset(source, cfg.name)
    except Exception as exc:  # the hub unreachable, no such dataset or config, unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ProblemSourceError(
            f"{cfg.path}: datasets.load_dataset failed ({type(exc).__name__}: {first[:200]})"
            + ("; the hub is not reachable offline (HF_HUB_OFFLINE)" if not local.exists() else "")
        ) from None
    return _dataset_table(Path(cfg.path), loaded, wanted, cfg.limit, cfg.split)


def _dataset_table(
    path: Path, loaded: Any, wanted: list[str], limit: int | None, split: str | None
) -> _Table:
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
        return _Table([], {}, 0)
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
    return _Table(columns, data, n_rows, split_names=split_names)


def _check_columns(table: _Table, cfg: ProblemSourceConfig) -> None:
    """Every configured column exists; otherwise name it, list the real ones, suggest one."""
    for field in ("prompt_column", "answer_column", "id_column", "split_column"):
        name = getattr(cfg, field)
        if name is None or name in table.columns:
            continue
        hint = ""
        lowered = {c.lower(): c for c in table.columns}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {lowered[close[0]]!r}?"
        available = ", ".join(table.columns) or "(none)"
        raise ProblemSourceError(
            f"{cfg.path}: column {name!r} ({field}) not found; available: {available}{hint}"
        )


def _as_text(value: Any) -> str | None:
    """A scalar cell as text (numbers via str); None for null/NaN; TypeError otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise TypeError(type(value).__name__)


def _texts(table: _Table, cfg: ProblemSourceConfig, field: str) -> list[str]:
    """The column named by ``cfg.<field>`` as non-empty strings, or one clear error."""
    name = getattr(cfg, field)
    out: list[str] = []
    bad: list[int] = []
    for i, value in enumerate(table.data[name]):
        try:
            text = _as_text(value)
        except TypeError as exc:
            raise ProblemSourceError(
                f"{cfg.path}: column {name!r} ({field}) holds {exc} values at "
                f"{table.where(i)}; expected text or numbers"
            ) from None
        if text is None or not text.strip():
            bad.append(i)
        out.append(text or "")
    if bad:
        raise ProblemSourceError(
            f"{cfg.path}: {len(bad)} of {table.n_rows} row(s) have a null or empty "
            f"{name!r} ({field}); first at {table.where(bad[0])}"
        )
    return out


def gsm8k_gold(solution: str) -> str | None:
    """The gold answer of a GSM8K solution: what follows its last ``####`` (``1,234`` ->
    ``1234``); None when there is none."""
    _, sep, tail = solution.rpartition("####")
    if not sep:
        return None
    gold = tail.strip().replace(",", "")
    return gold or None


def boxed_gold(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) of a solution, braces
    balanced (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); None when there is none."""
    return last_boxed(solution, ("\\boxed{", "\\fbox{")) or None


_GOLD = {"gsm8k": (gsm8k_gold, "a '#### <answer>' line"), "boxed": (boxed_gold, "a \\boxed{...}")}


def _gold_answers(table: _Table, cfg: ProblemSourceConfig) -> list[str]:
    """The answer column, as gold answers per ``cfg.answer_format``; one line naming the first
    row whose gold answer cannot be read."""
    cells = [a.strip() for a in _texts(table, cfg, "answer_column")]
    if cfg.answer_format == "plain":
        return cells
    parse, wants = _GOLD[cfg.answer_format]
    golds = [parse(c) for c in cells]
    bad = [i for i, g in enumerate(golds) if g is None]
    if bad:
        raise ProblemSourceError(
            f"{cfg.path}: {len(bad)} of {table.n_rows} row(s) have no gold answer in "
            f"{cfg.answer_column!r} (answer_format {cfg.answer_format}: {wants}); first at "
            f"{table.where(bad[0])}: {cells[bad[0]][-60:]!r}"
        )
    return [g for g in golds if g is not None]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ids(table: _Table, cfg: ProblemSourceConfig, family: str, prompts: list[str]) -> list[str]:
    """The user's ids (unique, non-empty), or ``<family>-<row>-<prompt hash>``.

    The default id changes when the prompt at a row changes, so a cache keyed
    by problem id never serves a stale answer for an edited problem.
    """
    if cfg.id_column is None:
        return [f"{family}-{i:06d}-{_sha(p)[:8]}" for i, p in enumerate(prompts)]
    ids = [t.strip() for t in _texts(table, cfg, "id_column")]
    dups = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dups:
        shown = ", ".join(repr(d) for d in dups[:5])
        raise ProblemSourceError(
            f"{cfg.path}: {len(dups)} duplicate id(s) in {cfg.id_column!r} (id_column), e.g. {shown}"
        )
    return ids


def _split_of(value: str) -> str | None:
    """'train' / 'test' for a recognised split name, else None."""
    v = value.strip().lower()
    return "train" if v in TRAIN_NAMES else "test" if v in TEST_NAMES else None


def _splits(table: _Table, cfg: ProblemSourceConfig, prompts: list[str], seed: int) -> list[str]:
    """Split per row: split column, else DatasetDict split names, else the seeded hash."""
    if cfg.split_column is not None:
        names, what = _texts(table, cfg, "split_column"), f"{cfg.split_column!r} (split_column)"
    elif table.split_names is not None:
        names, what = table.split_names, "DatasetDict split names"
    else:
        return [_hash_split(p, seed, cfg.test_fraction) for p in prompts]
    splits = [_split_of(n) for n in names]
    unknown = sorted({n for n, s in zip(names, splits, strict=True) if s is None})
    if unknown:
        raise ProblemSourceError(
            f"{cfg.path}: {what} has value(s) {', '.join(map(repr, unknown[:5]))} that are "
            f"neither train ({', '.join(sorted(TRAIN_NAMES))}) nor test "
            f"({', '.join(sorted(TEST_NAMES))})"
            + ("; set split to read one of them" if table.split_names is not None else "")
        )
    return splits  # type: ignore[return-value]


def _hash_split(prompt: str, seed: int, test_fraction: float) -> str:
    """'test' for a seeded-hash share ``test_fraction`` of prompts, else 'train'."""
    u = int(_sha(f"{seed}\0{prompt}")[:16], 16) / 2**64
    return "test" if u < test_fraction else "train"


def default_family(path: str) -> str:
    """The file stem (``data/gsm8k.jsonl`` -> ``gsm8k``), or a directory's name."""
    p = Path(path).expanduser()
    name = p.name if p.is_dir() else p.stem
    return name or "user"


def load_problems(cfg: ProblemSourceConfig, seed: int) -> list[dict[str, Any]]:
    """Read ``cfg.path`` into problem records (see the module docstring), in file order.

    ``seed`` only moves the hash split (used when no split column or DatasetDict
    split names exist). Raises :class:`ProblemSourceError` for anything the
    user must fix: missing file, unknown format, missing column, no rows,
    null or empty prompts/answers/ids, duplicate ids, unknown split names.
    """
    path = Path(cfg.path).expanduser()
    fmt = cfg.format if cfg.format == "hf_dataset" else detect_format(path, cfg.format)
    if cfg.split is not None and fmt not in ("hf_disk", "hf_dataset"):
        raise ProblemSourceError(
            f"{cfg.path}: split={cfg.split!r} applies to hf_disk and hf_dataset DatasetDicts only; "
            "use split_column for a column of split names"
        )
    named = (cfg.prompt_column, cfg.answer_column, cfg.id_column, cfg.split_column)
    wanted = list(dict.fromkeys(c for c in named if c is not None))
    if fmt == "jsonl":
        table = _read_jsonl(path, wanted, cfg.limit)
    elif fmt == "parquet":
        table = _read_parquet(path, wanted, cfg.limit)
    elif fmt == "hf_dataset":
        table = _read_hf_dataset(cfg, wanted)
    else:
        table = _read_hf_disk(path, wanted, cfg.limit, cfg.split)
    if table.n_rows == 0:
        raise ProblemSourceError(f"{cfg.path}: no rows (empty dataset)")
    _check_columns(table, cfg)
    family = cfg.family or default_family(cfg.path)
    prompts = _texts(table, cfg, "prompt_column")
    answers = _gold_answers(table, cfg)
    ids = _ids(table, cfg, family, prompts)
    splits = _splits(table, cfg, prompts, seed)
    return [
        {
            "problem_id": pid,
            "family": family,
            "split": split,
            "difficulty": 0,
            "prompt": prompt,
            "answer": answer,
            "source": cfg.path,
        }
        for pid, split, prompt, answer in zip(ids, splits, prompts, answers, strict=True)
    ]

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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from data.answers import last_boxed
from data.configbase import StrictModel
from data.problem_readers import (
    Format,
    ProblemSourceError,
    Table,
    detect_format,
    read_hf_dataset,
    read_hf_disk,
    read_jsonl,
    read_parquet,
)

TRAIN_NAMES = frozenset({"train", "training"})
TEST_NAMES = frozenset({"test", "testing", "validation", "valid", "val", "dev", "eval"})


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


def _check_columns(table: Table, cfg: ProblemSourceConfig) -> None:
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


def _texts(table: Table, cfg: ProblemSourceConfig, field: str) -> list[str]:
    """The column named by ``cfg.<field>`` as non-empty strings, or one clear error."""
    name = getattr(cfg, field)
    values = table.data[name]
    types = set(map(type, values))  # the common cases at C speed: all text, or all integers
    if types == {int}:
        values, types = list(map(str, values)), {str}
    if types == {str} and all(map(str.strip, values)):
        return values
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
            f"{cfg.path}: {len(bad)} of {table.n_rows} row(s) have a missing, null or empty "
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


def _gold_answers(table: Table, cfg: ProblemSourceConfig) -> list[str]:
    """The answer column, as gold answers per ``cfg.answer_format``; one line naming the first
    row whose gold answer cannot be read."""
    cells = list(map(str.strip, _texts(table, cfg, "answer_column")))
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


def _user_ids(table: Table, cfg: ProblemSourceConfig) -> list[str] | None:
    """The id column (unique, non-empty), or None when ids are made from the prompts; a
    duplicate is named with both of its places."""
    if cfg.id_column is None:
        return None
    ids = list(map(str.strip, _texts(table, cfg, "id_column")))
    if len(set(ids)) == len(ids):
        return ids
    extra = len(ids) - len(set(ids))
    # each id's first row, built at C speed (later rows overwrite earlier ones in reverse)
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))
    i = next(i for i, f in enumerate(map(first.__getitem__, ids)) if f != i)
    raise ProblemSourceError(
        f"{cfg.path}: duplicate id {ids[i]!r} in {cfg.id_column!r} (id_column) at "
        f"{table.where(first[ids[i]])} and {table.where(i)}; {extra} repeated row(s) in all"
    )


def _ids(family: str, prompts: list[str]) -> list[str]:
    """``<family>-<row>-<prompt hash>``: it changes when the prompt at a row changes, so a
    cache keyed by problem id never serves a stale answer for an edited problem."""
    return [f"{family}-{i:06d}-{_sha(p)[:8]}" for i, p in enumerate(prompts)]


def _split_of(value: str) -> str | None:
    """'train' / 'test' for a recognised split name, else None."""
    v = value.strip().lower()
    return "train" if v in TRAIN_NAMES else "test" if v in TEST_NAMES else None


def _named_splits(table: Table, cfg: ProblemSourceConfig) -> list[str] | None:
    """Split per row from the split column, else from DatasetDict split names; None when
    neither says (the seeded hash decides)."""
    if cfg.split_column is not None:
        names, what = _texts(table, cfg, "split_column"), f"{cfg.split_column!r} (split_column)"
    elif table.split_names is not None:
        names, what = table.split_names, "DatasetDict split names"
    else:
        return None
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


@dataclass
class ProblemRows:
    """A problem source read and checked by every rule: one entry per row, in file order."""

    prompts: list[str]
    answers: list[str]
    ids: list[str] | None  # the id column's, or None: made from the prompts
    splits: list[str] | None  # from a split column or split names, or None: hashed


def read_problem_rows(cfg: ProblemSourceConfig) -> ProblemRows:
    """Read ``cfg.path`` and check every rule a problem set must meet; the first broken one
    is a one-line :class:`ProblemSourceError`: missing file, unknown format, missing column,
    no rows, null or empty prompts/answers/ids, no gold answer, duplicate ids, unknown split
    names, bad JSON or bytes that are not UTF-8.

    The one check of a problem source: ``mpd run`` calls it before Prefect starts
    (:func:`check_problem_source`) and the problems stage through :func:`load_problems`, so
    the two cannot disagree. It writes nothing (``hf_dataset`` aside: ``datasets`` fills its
    own cache, which the stage then reuses).
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
        table = read_jsonl(path, wanted, cfg.limit)
    elif fmt == "parquet":
        table = read_parquet(path, wanted, cfg.limit)
    elif fmt == "hf_dataset":
        table = read_hf_dataset(cfg.path, cfg.name, wanted, cfg.limit, cfg.split)
    else:
        table = read_hf_disk(path, wanted, cfg.limit, cfg.split)
    if table.n_rows == 0:
        raise ProblemSourceError(f"{cfg.path}: no rows (empty dataset)")
    _check_columns(table, cfg)
    prompts = _texts(table, cfg, "prompt_column")
    answers = _gold_answers(table, cfg)
    return ProblemRows(prompts, answers, _user_ids(table, cfg), _named_splits(table, cfg))


def check_problem_source(cfg: ProblemSourceConfig) -> int:
    """The number of problems in ``cfg.path``, every rule checked (for ``flows/preflight.py``)."""
    return len(read_problem_rows(cfg).prompts)


def load_problems(cfg: ProblemSourceConfig, seed: int) -> list[dict[str, Any]]:
    """``cfg.path``'s problems as records (see the module docstring), in file order.

    ``seed`` only moves the hash split (used when no split column or DatasetDict split names
    exist). Every error is :func:`read_problem_rows`'s.
    """
    rows = read_problem_rows(cfg)
    family = cfg.family or default_family(cfg.path)
    ids = rows.ids or _ids(family, rows.prompts)
    splits = rows.splits or [_hash_split(p, seed, cfg.test_fraction) for p in rows.prompts]
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
        for pid, split, prompt, answer in zip(ids, splits, rows.prompts, rows.answers, strict=True)
    ]

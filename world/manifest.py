"""Bootstrap assets: a directory holding the built-in world's trained models.

    world/assets/
      tokenizer/  student/  teacher/     Hugging Face directories (safetensors)
      evals.parquet                      the bootstrap's evaluation (table bootstrap_evals)
      MANIFEST.json                      sha256 of every file, the command and the
                                         config that produced them, the metrics, versions

The manifest is what makes shipped models honest: anyone can rerun the
recorded command and compare, and a file altered after the fact fails
:func:`verify_assets` instead of silently changing every later result.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import UserError
from data.fsutil import atomic_write_json, sha256_file
from data.schemas import BOOTSTRAP_EVALS, conform

MANIFEST = "MANIFEST.json"
PARTS = ("tokenizer", "student", "teacher")


class AssetsError(UserError):
    """Missing or altered bootstrap assets."""


def file_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_assets(
    out: Path, rows: list[dict], metrics: dict[str, Any], config: dict, command: str
) -> dict:
    """Write evals.parquet and MANIFEST.json into ``out`` (models already saved there)."""
    import torch
    import transformers

    table = conform(pa.Table.from_pylist(rows), BOOTSTRAP_EVALS, name="bootstrap_evals")
    pq.write_table(table, out / "evals.parquet", compression="zstd")
    manifest = {
        "command": command,
        "config": config,
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "files": file_digests(out),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def verify_assets(root: Path) -> dict:
    """The manifest, after checking every file's sha256; raises AssetsError otherwise."""
    path = root / MANIFEST
    if not path.is_file():
        raise AssetsError(f"no bootstrap assets at {root} (missing {MANIFEST})")
    manifest = json.loads(path.read_text())
    actual = file_digests(root)
    for name, digest in manifest["files"].items():
        if actual.get(name) != digest:
            raise AssetsError(f"bootstrap asset {root / name} is missing or altered")
    return manifest


def check_same_tokenizer_files(a: Path, b: Path) -> None:
    """Two assets directories whose models are to be used together share one tokenizer."""
    name = "tokenizer/tokenizer.json"
    if sha256_file(a / name) != sha256_file(b / name):
        raise AssetsError(f"{a} and {b} have different tokenizers: their models cannot be combined")


def copy_assets(src: Path, dst: Path) -> dict:
    """Verify ``src`` then copy it to ``dst`` (a staging directory)."""
    manifest = verify_assets(src)
    for part in (*PARTS, "evals.parquet", MANIFEST):
        s, d = src / part, dst / part
        if s.is_dir():
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)
    return manifest

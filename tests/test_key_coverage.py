"""A key covers exactly what shapes a stage's output: one test per hole, one per setting left out.

Each test computes the key of every (round, stage) of a 2-round campaign for two configs
(``flows.modes.plan_keys``: from the declarations alone, nothing runs) and compares which keys
changed: the stage the change shapes and everything downstream of it, and nothing else. The
models are the shipped world's directories (no bootstrap needed); vLLM's interpreter, which
cannot run here, is a stand-in script that answers the version question as vLLM's would
(``fake_vllm_python``), so the versions in the key are provably that interpreter's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import data.keys
from data.keys import closure, code_version, forget_code_versions
from flows.config import RunConfig
from flows.modes import plan_keys
from tests.conftest import REPO

WORLD = REPO / "world" / "assets"
BASE: dict[str, Any] = {
    "rounds": 2,
    "models": {"student": str(WORLD / "student"), "teacher": str(WORLD / "teacher")},
    "problems": {"n_train": 40, "n_test": 10, "n_heldout": 5},
}
ALL = {
    "0/problems",
    "0/eval",
    *(
        f"{r}/{s}"
        for r in (1, 2)
        for s in ("sample", "rewrite", "score", "filter", "train", "eval")
    ),
}
ROUND_2 = {f"2/{s}" for s in ("sample", "rewrite", "score", "filter", "train", "eval")}


def merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def keys(ws: Path, changes: dict | None = None, base: dict | None = None) -> dict[str, str]:
    cfg = RunConfig.model_validate(merge({**(base or BASE), "workspace": str(ws)}, changes or {}))
    return {f"{r}/{stage}": k.key for r, stage, k in plan_keys(cfg)}


def changed(ws: Path, changes: dict, base: dict | None = None) -> set[str]:
    before, after = keys(ws, None, base), keys(ws, changes, base)
    assert before.keys() == after.keys()
    return {where for where in before if before[where] != after[where]}


@pytest.fixture
def fake_vllm_python(tmp_path: Path) -> Path:
    """A stand-in for vLLM's interpreter (vLLM cannot run here): it answers the version
    question with the versions in ``versions.json`` beside it, reports ``site/`` as its site
    directory, and counts how often it was asked."""
    root = tmp_path / "vllm-env"
    (root / "site").mkdir(parents=True)
    (root / "versions.json").write_text(json.dumps({"vllm": "0.11.0", "torch": "2.8.0"}))
    script = root / "python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo x >> "{root}/asked"\n'
        f'printf \'{{"versions": %s, "sites": ["{root}/site"]}}\\n\' "$(cat {root}/versions.json)"\n'
    )
    script.chmod(0o755)
    return script


def vllm(python: Path, **settings: Any) -> dict[str, Any]:
    return {"kind": "vllm", "python": str(python), **settings}


# -- the holes ---------------------------------------------------------------------------------
def test_models_dtype_is_in_every_key_whose_weights_it_casts(tmp_path: Path) -> None:
    """The student's dtype shapes round 0's evaluation and every stage downstream of it; the
    problems, which load no model, stay."""
    assert changed(tmp_path, {"models": {"dtype": "bfloat16"}}) == ALL - {"0/problems"}


def test_a_served_engine_is_not_keyed_by_models_dtype(tmp_path: Path) -> None:
    """An openai engine's server chose its own dtype: models.dtype does not shape its rows, and
    train (which casts the student itself) is where the change enters."""
    served = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    base = merge(BASE, {"engines": {"student": served, "teacher": served}})
    assert changed(tmp_path, {"models": {"dtype": "bfloat16"}}, base) == {
        "1/train",
        "1/eval",
        *ROUND_2,
    }


def test_an_engines_kind_recomputes_the_stages_that_run_it(
    tmp_path: Path, fake_vllm_python: Path
) -> None:
    """The rewriter moved to vLLM: rewrite and what reads it recompute; the problems, round 0's
    evaluation and round 1's samples (other engines) stay."""
    change = {"engines": {"rewriter": vllm(fake_vllm_python)}}
    assert changed(tmp_path, change) == ALL - {"0/problems", "0/eval", "1/sample"}


def test_vllm_args_shape_the_stages_of_that_engine_only(
    tmp_path: Path, fake_vllm_python: Path
) -> None:
    base = merge(BASE, {"engines": {"teacher": vllm(fake_vllm_python)}})
    change = {"engines": {"teacher": {"vllm_args": {"kv_cache_dtype": "fp8"}}}}
    # the teacher's engine rewrites (the rewriter defaults to it) and scores
    assert changed(tmp_path, change, base) == ALL - {"0/problems", "0/eval", "1/sample"}
    for setting in ({"max_model_len": 4096}, {"max_logprobs": 128}, {"tensor_parallel_size": 2}):
        shaped = changed(tmp_path, {"engines": {"teacher": setting}}, base)
        assert shaped == ALL - {"0/problems", "0/eval", "1/sample"}, setting
    # settings of another kind are ignored by an hf engine, so they are out of its key
    assert changed(tmp_path, change) == set()


def test_the_problem_files_content_is_in_the_key(tmp_path: Path) -> None:
    """Edited in place (same path, same size): the problems and everything after recompute. A
    touch, or a copy at another path, changes nothing."""
    file = tmp_path / "problems.jsonl"
    lines = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
    file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    base = merge(BASE, {"problems": {"source": "file", "file": {"path": str(file)}}})
    before = keys(tmp_path / "ws", None, base)
    os.utime(file, ns=(1, 1))  # a touch (here: back in time) is no edit
    assert keys(tmp_path / "ws", None, base) == before
    text = file.read_text()
    file.write_text(text.replace("What is 3 + 3?", "What is 3 + 4?").replace('"6"', '"7"'))
    assert len(file.read_text()) == len(text)
    after = keys(tmp_path / "ws", None, base)
    assert {w for w in before if before[w] != after[w]} == ALL


def test_the_filter_files_content_not_its_path_is_in_the_key(tmp_path: Path) -> None:
    sql = REPO / "data" / "sql" / "filter.sql"
    moved = tmp_path / "mine.sql"
    shutil.copy(sql, moved)
    assert changed(tmp_path, {"filter": {"sql": str(moved)}}) == set()
    moved.write_text(moved.read_text() + "\n-- a comment is an edit\n")
    assert changed(tmp_path, {"filter": {"sql": str(moved)}}) == {
        "1/filter",
        "1/train",
        "1/eval",
        *ROUND_2,
    }


@pytest.fixture
def code_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This project's packages copied, and keys computed from the copy (``data.keys.ROOT``)."""
    root = tmp_path / "code"
    for package in data.keys.PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    monkeypatch.setattr(data.keys, "ROOT", root)
    forget_code_versions()
    yield root
    forget_code_versions()


def edit(root: Path, module: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + "\n# edited by a test\n")
    forget_code_versions()


def test_the_vllm_worker_started_by_path_is_in_the_engine_stages_code(
    tmp_path: Path, code_copy: Path
) -> None:
    before = {m: code_version(m) for m in ("tasks.sample", "tasks.filter", "tasks.train")}
    base = keys(tmp_path / "ws")
    edit(code_copy, "engines.vllm_worker")
    assert code_version("tasks.sample") != before["tasks.sample"]
    assert code_version("tasks.filter") == before["tasks.filter"]
    assert code_version("tasks.train") == before["tasks.train"]
    after = keys(tmp_path / "ws")
    assert {w for w in base if base[w] != after[w]} == ALL - {"0/problems"}


def test_the_solve_stage_is_keyed_by_its_own_module(tmp_path: Path, code_copy: Path) -> None:
    """An edit of tasks/solve.py recomputes off_policy's solve and what follows; no stage of
    mpd (which never solves) and not the problems or round 0."""
    off = merge(BASE, {"method": "off_policy"})
    before_off, before_mpd = keys(tmp_path / "ws", None, off), keys(tmp_path / "ws")
    edit(code_copy, "tasks.solve")
    after_off, after_mpd = keys(tmp_path / "ws", None, off), keys(tmp_path / "ws")
    assert after_mpd == before_mpd
    assert {w for w in before_off if before_off[w] != after_off[w]} == {
        f"{r}/{s}" for r in (1, 2) for s in ("solve", "score", "train", "eval")
    }


def test_orchestration_and_model_import_code_is_in_no_stage_closure() -> None:
    """The Prefect stage task and the GGUF importer shape no row: editing them recomputes
    nothing (4c4a540 reached both from every stage through tasks/context.py)."""
    stages = ("sample", "solve", "rewrite", "score", "filter", "truncate", "self_select")
    stages += ("train", "evaluate")
    for stage in (*stages, "problems", "bootstrap"):
        files = closure(f"tasks.{stage}").files
        assert not {"tasks.prefect_stage", "train.gguf", "tasks.registry"} & set(files), stage


# -- library versions --------------------------------------------------------------------------
def test_vllm_versions_come_from_vllms_own_interpreter_once(
    tmp_path: Path, fake_vllm_python: Path
) -> None:
    base = merge(BASE, {"engines": {"teacher": vllm(fake_vllm_python)}})
    cfg = RunConfig.model_validate({**base, "workspace": str(tmp_path / "ws")})
    docs = {f"{r}/{s}": k.doc for r, s, k in plan_keys(cfg)}
    assert docs["1/score"]["libraries"]["engine.teacher"] == {
        "vllm": "0.11.0",
        "torch": "2.8.0",
    }
    assert "engine.teacher" not in docs["1/sample"]["libraries"]
    # this interpreter's versions, of the libraries the stage's code imports
    assert "torch" in docs["1/sample"]["libraries"]["python"]
    assert set(docs["1/filter"]["libraries"]["python"]) >= {"duckdb", "pyarrow"}
    assert "torch" not in docs["1/filter"]["libraries"]["python"]
    asked = fake_vllm_python.parent / "asked"
    plan_keys(cfg)
    assert len(asked.read_text().split()) == 1, "asked once, then cached"

    # vLLM upgraded in its environment: its site directory changes, the key follows
    (fake_vllm_python.parent / "versions.json").write_text(json.dumps({"vllm": "0.12.0"}))
    (fake_vllm_python.parent / "site" / "vllm-0.12.0.dist-info").mkdir()
    after = {f"{r}/{s}": k.doc for r, s, k in plan_keys(cfg)}
    assert after["1/score"]["libraries"]["engine.teacher"]["vllm"] == "0.12.0"
    assert changed_docs(docs, after) == ALL - {"0/problems", "0/eval", "1/sample"}


def test_the_libraries_each_stage_computes_with_are_in_its_key(tmp_path: Path) -> None:
    """The versions of the libraries a stage's code imports, this interpreter's: peft where a
    model (and its adapter) is loaded, datasets and reasoning-gym where problems are read."""
    import importlib.metadata

    cfg = RunConfig.model_validate({**BASE, "workspace": str(tmp_path)})
    docs = {f"{r}/{s}": k.doc["libraries"]["python"] for r, s, k in plan_keys(cfg)}

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    for where, dists in {
        "0/problems": ("datasets", "reasoning-gym", "pyarrow"),
        "1/sample": ("torch", "transformers", "tokenizers", "peft"),
        "1/train": ("torch", "transformers", "peft", "duckdb"),
        "1/filter": ("duckdb", "pyarrow"),
    }.items():
        assert {d: docs[where].get(d) for d in dists} == {d: version(d) for d in dists}, where
    assert "vllm" not in docs["1/sample"], "vLLM's version is its own interpreter's, not ours"


def changed_docs(before: dict, after: dict) -> set[str]:
    return {w for w in before if json.dumps(before[w]) != json.dumps(after[w])}


def test_a_missing_vllm_interpreter_is_one_line(tmp_path: Path) -> None:
    change = {"engines": {"teacher": vllm(tmp_path / "nope" / "python")}}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "--keys", "-w", str(tmp_path)]
        + [a for k, v in flat({**BASE, **change}).items() for a in ("--set", f"{k}={v}")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no Python interpreter at" in proc.stderr and "Traceback" not in proc.stderr


def flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("vllm_args", "env"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


# -- what stays out ----------------------------------------------------------------------------
NOT_SHAPING: list[tuple[str, dict]] = [
    ("filter.timeout_s", {"filter": {"timeout_s": 5}}),
    ("train.checkpoint_every", {"train": {"checkpoint_every": 3}}),
    (
        "train.distributed",
        {
            "train": {
                "distributed": {
                    "nproc": 8,
                    "strategy": "fsdp",
                    "launcher": ["srun", "torchrun"],
                    "activation_checkpointing": True,
                }
            }
        },
    ),
    ("engines.*.shard_workers", {"engines": {"student": {"shard_workers": 4}}}),
    ("runner.kind", {"runner": {"kind": "dask", "n_workers": 3}}),
    ("rounds", {"rounds": 5}),  # more rounds add keys, they change none
    ("cache_from", {"cache_from": ["/elsewhere"]}),
    ("storage.cache", {"storage": {"cache": "/tmp/elsewhere"}}),
    ("bench", {"bench": {"seeds": [1, 2]}}),
]


@pytest.mark.parametrize(("name", "change"), NOT_SHAPING, ids=[n for n, _ in NOT_SHAPING])
def test_a_setting_that_shapes_no_output_recomputes_nothing(
    tmp_path: Path, name: str, change: dict
) -> None:
    before, after = keys(tmp_path, None), keys(tmp_path, change)
    assert {w: after[w] for w in before} == before, name


def test_log_levels_recompute_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log levels live in the environment and on loggers, never in a config section a stage
    declares: turning them up or down leaves every key as it was."""
    before = keys(tmp_path)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("PREFECT_LOGGING_LOGGERS_ROOT_LEVEL", "DEBUG")
    mpd_log = logging.getLogger("mpd")
    monkeypatch.setattr(mpd_log, "level", logging.DEBUG)
    assert keys(tmp_path) == before


def test_shard_sizes_that_change_rows_are_in_the_key(tmp_path: Path) -> None:
    """Sample draws with one seed per shard; score's shard is what the engine batches (another
    batch moves the logprobs by float noise): each recomputes its stage and what follows."""
    sample = changed(tmp_path, {"sample": {"shard_size": 7}})
    assert sample == ALL - {"0/problems", "0/eval"}
    score = changed(tmp_path, {"score": {"shard_size": 7}})
    assert score == {"1/score", "1/train", "1/eval", *ROUND_2}


def test_served_and_vllm_engine_settings_that_shape_nothing_recompute_nothing(
    tmp_path: Path, fake_vllm_python: Path
) -> None:
    """Concurrency, timeouts, retries, where the server is, how much GPU memory vLLM takes,
    how many replicas serve, which path names the same interpreter: in no key."""
    served = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    base = merge(BASE, {"engines": {"student": served, "teacher": vllm(fake_vllm_python)}})
    same_python = fake_vllm_python.parent / "python-link"
    same_python.symlink_to(fake_vllm_python)
    for change in (
        {"student": {"max_concurrency": 64, "timeout_s": 5, "max_retries": 0}},
        {"student": {"retry_backoff_s": 9, "base_url": "http://10.0.0.1:8000/v1"}},
        {"student": {"api_key_env": "MY_KEY"}},
        {"teacher": {"gpu_memory_utilization": 0.5, "data_parallel_size": 2}},
        {"teacher": {"startup_timeout_s": 60, "shard_workers": 2}},
        {"teacher": {"python": str(same_python)}},
    ):
        assert changed(tmp_path, {"engines": change}, base) == set(), change


def test_every_engine_setting_is_sorted_in_or_out_of_the_key() -> None:
    """A new engine field must be classified: it shapes output for some kind, or for none."""
    from engines.config import NOT_SHAPING as OUT
    from engines.config import SHAPING, EngineConfig

    shaping = {f for fields in SHAPING.values() for f in fields} | {"kind", "dtype"}
    assert not shaping & set(OUT)
    assert shaping | set(OUT) == set(EngineConfig.model_fields)


def test_keys_name_no_workspace(tmp_path: Path) -> None:
    """Two workspaces with the same config have the same keys (what ``cache_from`` shares)."""
    assert keys(tmp_path / "a") == keys(tmp_path / "b")


def test_train_precision_shapes_train_and_what_follows(tmp_path: Path) -> None:
    """bf16-mixed trains with float32 master weights and bf16 compute: another student, so
    train and everything after it recompute (the process count and strategy do not)."""
    change = {"train": {"precision": "bf16-mixed"}}
    assert changed(tmp_path, change) == {"1/train", "1/eval", *ROUND_2}

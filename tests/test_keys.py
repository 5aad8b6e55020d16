"""Stage keys: which code a key covers (data.keys), checked on this repository's own modules."""

from __future__ import annotations

import os
import subprocess
import sys

from data.keys import closure, code_version, libraries_of, library_versions, module_closure
from tests.conftest import REPO


def test_a_stage_key_covers_the_code_it_imports_transitively() -> None:
    """train reaches the losses through the trainer and grades through data.answers; the
    filter reaches neither, so editing the losses cannot recompute a filter."""
    train = module_closure("tasks.train")
    for reached in [
        "train.trainer",
        "train.step",  # the optimizer step the trainer runs
        "train.prepare",
        "train.losses",
        "train.topk_losses",
        "train.divergences",  # the KL/JSD every loss is made of (train/fused.py's too)
        "train.fused",
        "train.models",
        "data.answers",
    ]:
        assert reached in train, reached
    assert "engines.hf" not in train  # training runs no engine: an engine edit leaves it cached
    sample = module_closure("tasks.sample")
    assert {"engines.vllm", "engines.openai", "data.traces", "data.answers"} <= set(sample)
    assert {"engines.openai_http", "data.stage_writer"} <= set(sample)  # its requests, its commit
    assert not {"train.losses", "train.divergences"} & set(sample)
    filt = module_closure("tasks.filter")
    assert "train.losses" not in filt and "engines.hf" not in filt
    assert {"data", "tasks"} <= set(filt)  # a package's __init__ runs before its modules
    problems = module_closure("tasks.problems")
    assert "world.arith" in problems  # the built-in world generates the problems


def test_closure_follows_imports_inside_functions() -> None:
    """tasks.train imports the trainer inside its body (lazily); the key must still cover it."""
    assert "train.trainer" in module_closure("tasks.train")
    assert "tasks.registry" not in module_closure("tasks.train")  # no stage covers the others
    assert "tasks.sample" not in module_closure("tasks.train")


def test_code_version_names_the_libraries_and_the_stage_module() -> None:
    versions = library_versions()
    assert versions["torch"].startswith("2.") and "transformers" in versions
    assert code_version("tasks.filter") != code_version("tasks.truncate")
    # a stage that runs no engine does not recompute when an engine's code changes
    for stage in ("tasks.filter", "tasks.problems"):
        assert not {"engines.hf", "engines.vllm", "tasks.engines"} & set(module_closure(stage))


def test_closure_follows_the_entry_files_a_module_starts() -> None:
    """engines/vllm_worker.py is started by path (no import names it): every stage that reaches
    the vLLM engine covers it, and its libraries are its interpreter's, not this one's."""
    sample = closure("tasks.sample")
    assert "engines.vllm_worker" in sample.started
    assert "engines.vllm_worker" not in sample.local
    assert "engines.vllm_worker" in module_closure("tasks.score")
    assert libraries_of(sample.started) == ("tokenizers", "torch", "transformers", "vllm")
    assert "vllm" not in libraries_of(sample.local)


def test_data_needs_no_stage_module_imported_first() -> None:
    """The table registry and the catalog work with data/ alone (4c4a540 raised unless
    tasks.registry had been imported)."""
    code = (
        "import sys\n"
        "from data.catalog import views\n"
        "from data.tables import tables\n"
        "assert {'samples', 'decisions', 'evals', 'problems'} <= set(tables()), tables()\n"
        "assert 'round_summary' in views()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tasks', 'flows')]\n"
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

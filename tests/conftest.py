"""Test-session setup: offline, single-threaded, Prefect kept in a temp home.

These variables are set at import time, before any test module imports torch,
transformers or Prefect, because those read them once on import.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="mpd-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_HOME / "prefect" / "storage")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """One thread: the CI machine has two shared cores and tests run beside other work."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocess-based tests."""
    return sys.executable

"""One engine per role: a role that moves to a new model closes the engine it used."""

from __future__ import annotations

import shutil
from pathlib import Path

from engines.config import EngineConfig
from flows.bootstrap import SHIPPED
from tasks.engines import _ENGINES, close_engines, engine_for


def test_a_role_moving_to_a_new_model_closes_its_old_engine(tmp_path: Path) -> None:
    """Each round's student is a new checkpoint; its predecessor's engine must not linger."""
    a, b = tmp_path / "round0", tmp_path / "round1"
    shutil.copytree(SHIPPED / "student", a)
    shutil.copytree(SHIPPED / "student", b)
    cfg = EngineConfig()
    try:
        first = engine_for(cfg, a, dtype="float32", device="cpu", role="student")
        assert engine_for(cfg, a, dtype="float32", device="cpu", role="student") is first
        # the teacher role on the same model shares the engine; moving the student keeps it
        shared = engine_for(cfg, a, dtype="float32", device="cpu", role="teacher")
        assert shared is first
        second = engine_for(cfg, b, dtype="float32", device="cpu", role="student")
        assert second is not first and first.model is not None and len(_ENGINES) == 2
        # once no role uses round0's engine, it is closed and forgotten
        engine_for(cfg, b, dtype="float32", device="cpu", role="teacher")
        assert first.model is None and len(_ENGINES) == 1
    finally:
        close_engines()
    assert second.model is None and not _ENGINES

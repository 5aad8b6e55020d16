"""Bootstrap stage: the reference world's tokenizer, student and teacher in the workspace.

It runs once per workspace, before the problems, and only when a model is ``builtin:``; the
flow that installs it (copied from ``assets/world`` or trained here) is ``flows/bootstrap.py``.
Its table is the world's own evaluation of the installed models.
"""

from __future__ import annotations

from data.schemas import BOOTSTRAP_EVALS
from data.tables import Table
from tasks.stage import Stage

STAGE = Stage(
    name="bootstrap",
    summary="the reference world's models, installed into the workspace (builtin: models only)",
    run=None,  # flows/bootstrap.py's ensure_bootstrap, before the problems
    tables=(Table("bootstrap_evals", "bootstrap", "evals.parquet", BOOTSTRAP_EVALS),),
    config="bootstrap",
    per_round=False,
)
